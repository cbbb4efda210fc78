"""vtdx's own test scaffolding, kept apart from the product: the freestanding test guest,
SEAMCALL scripts it replays, a host-side driver that issues KVM's TD SEAMCALL sequences, and
the model's invariant checker, the in-process TD and test guest of the TD vCPU engine.

Imports: anything; no product package imports it.
"""
