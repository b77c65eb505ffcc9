"""Serving: the web app that generates from, steers and compares models (:mod:`~diffalign.serve.app`, run by
``diffalign serve``), its generation worker (:mod:`~diffalign.serve.worker`), the models it holds
(:mod:`~diffalign.serve.models`), its page (``page.html``) and the reward server
(:mod:`~diffalign.serve.reward_server`, run by ``diffalign reward-server``).

serve/ may import the whole library; nothing in the library imports serve/. It needs the ``serve`` extra
(fastapi, uvicorn): ``pip install diffalign[serve]``.
"""
