"""Reading other projects' files safely: restricted unpickling (:mod:`~calmwild.interop.safe_pickle`) and NVlabs/edm
network pickles (:mod:`~calmwild.interop.edm`). Safetensors weights are part of :mod:`calmwild.checkpoints`."""
