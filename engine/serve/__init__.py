"""``maskrcnn-engine serve``: the pipeline behind an HTTP endpoint (the Open Inference Protocol and
``POST /predict``), with dynamic batching that never changes a request's answer. Needs the
``serve`` extra: ``pip install 'maskrcnn-engine[serve]'``."""
