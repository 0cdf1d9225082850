"""``ddpm demo``: a local web page (Gradio) over the run layer, one more front end beside the command line.

* :mod:`.actions` - what each tab does, with the same :mod:`ddpmlab.runs`, editing and viz calls as
  ``ddpm sample`` / ``inpaint`` / ``img2img`` / ``viz reverse`` (no Gradio needed);
* :mod:`.app` - the page itself and :func:`serve` (needs ``pip install 'ddpmlab[demo]'``).
"""

from ddpmlab.demo.actions import Limits, Runs
from ddpmlab.demo.app import INSTALL_HINT, build_app, import_gradio, serve

__all__ = ["Limits", "Runs", "build_app", "serve", "import_gradio", "INSTALL_HINT"]
