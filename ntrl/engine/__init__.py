"""The tangent engine: every NTVar and NTCov of ntrl comes from :class:`ntrl.engine.tangent.TangentEngine`
(its torch.func reference, and the faster structured backend tested against it in float64)."""
