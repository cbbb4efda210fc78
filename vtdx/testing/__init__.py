"""vtdx's own test scaffolding, kept apart from the product: the freestanding test guest,
SEAMCALL scripts it replays, a host-side driver that issues KVM's TD SEAMCALL sequences, and
the model's invariant checker.

Imports: anything; no product package imports it.
"""
