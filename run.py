"""Development server: `python run.py` (production: gunicorn -c gunicorn.conf.py)."""

from speech2image.app import create_app
from speech2image.cli import warn_if_exposed
from speech2image.config import load_settings

if __name__ == "__main__":
    settings = load_settings()
    app = create_app(settings)
    warn_if_exposed(settings)
    app.run(host=settings.host, port=settings.port, debug=settings.debug, threaded=True)
