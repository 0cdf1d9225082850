"""``ddpm demo``: a local web page (Gradio) over the run layer, one more front end beside the command line.

* :mod:`.actions` - what each tab does, with the same :mod:`ddpmlab.runs`, editing and viz calls as
  ``ddpm sample`` / ``inpaint`` / ``img2img`` / ``viz reverse`` (no Gradio needed);
* :mod:`.serving` - the bounds of a request, the served runs and the request folders (no Gradio needed);
* :mod:`.app` - the page itself and :func:`serve` (needs ``pip install 'ddpmlab[demo]'``).
"""

from ddpmlab.demo.app import INSTALL_HINT, UPLOAD_MB, build_app, import_gradio, serve
from ddpmlab.demo.serving import KEEP_REQUESTS, Limits, Runs

__all__ = ["Limits", "Runs", "build_app", "serve", "import_gradio", "INSTALL_HINT", "KEEP_REQUESTS", "UPLOAD_MB"]
