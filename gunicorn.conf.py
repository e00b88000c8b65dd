"""Production gunicorn settings for the embedded mode: `gunicorn -c gunicorn.conf.py`.

One worker process, many threads: models live in process memory, and every extra worker
process would load its own copy of every model (Whisper and each Stable Diffusion
checkpoint), multiplying RAM and GPU memory for no gain. Threads share the resident models;
the model loader's leases keep them safe. Scale out with the distributed mode instead.
"""

from speech2image.cli import gunicorn_options
from speech2image.config import load_settings

wsgi_app = "speech2image.app:create_app()"
globals().update(gunicorn_options(load_settings()))
