"""Development server: `python run.py` (production: gunicorn -c gunicorn.conf.py)."""

from speech2image.app import create_app
from speech2image.config import load_settings

if __name__ == "__main__":
    settings = load_settings()
    create_app(settings).run(
        host=settings.host, port=settings.port, debug=settings.debug, threaded=True
    )
