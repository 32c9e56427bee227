"""The public losses, each a short composition: check (:mod:`jaxsoftmax.checks`), compute
(:mod:`jaxsoftmax.core` or :mod:`jaxsoftmax.tiles`), reduce. The package
:mod:`jaxsoftmax` re-exports them; import them from there."""
