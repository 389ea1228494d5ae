"""ntrl: Price's equation for neural networks, measured inside policy-gradient training.

    dX/dt = ∇X · ∇U = NTCov(X, U)

The engine (:mod:`ntrl.engine.tangent`) computes every tangent quantity; the tracker
(:mod:`ntrl.tracker`) checks predicted against realised changes during training.
"""

__version__ = "0.1.0"
