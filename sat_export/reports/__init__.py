"""What people read: ``sat-eval`` scores and grounding (``evaluate``), attention ``overlays``, the HTML report (``html``)
and the ``sat-infer --overlays`` gallery."""
