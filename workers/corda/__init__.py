"""CorDA at cluster scale: covariance actors (replica, layer-wise), reducers, decomposition, the init-fidelity check.
May import storage, runtime, data, methods, model.
"""
