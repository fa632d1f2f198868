"""Entry point of a submission: `uvicorn main:app --host 0.0.0.0 --port 80`.

The server code is the same for every submission; what differs is
`serve_config.json` beside this file, rendered from the submission's spec.
`MODEL_PATH` / `ADAPTER_PATH` override the model references.
"""

import logging
import os
from pathlib import Path

from helm_server.app import create_app
from helm_server.settings import SERVE_CONFIG_FILE, load_serve_config

config = load_serve_config(Path(__file__).resolve().with_name(SERVE_CONFIG_FILE))
logging.basicConfig(
    level=os.environ.get("LOG_LEVEL", config.server.log_level).upper(),
    format="%(asctime)s %(levelname)s %(name)s: %(message)s",
)
app = create_app(config)
