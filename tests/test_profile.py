"""Platform profiles and module features as user choices (``--profile``, ``--features``)."""

from __future__ import annotations

import pytest

from vtdx.abi import fields as f
from vtdx.errors import VtdxError
from vtdx.platform.profile import FEATURES, Profile
from vtdx.units import GiB


def test_default_profile_is_static_pamt_on_the_1_5_tree() -> None:
    p = Profile.named("default", 2, 2 * GiB)
    assert (p.name, p.generation, p.dynamic_pamt) == ("default", "1.5", False)
    assert not p.features0 & f.FEATURES0_DYNAMIC_PAMT


def test_dpamt_profile_reports_dynamic_pamt_and_non_interruptible_demote() -> None:
    p = Profile.named("dpamt", 2, 2 * GiB)
    assert (p.name, p.generation) == ("dpamt", "dpamt")
    assert p.features0 & f.FEATURES0_DYNAMIC_PAMT
    assert p.features0 & f.FEATURES0_DEMOTE_NOINTERRUPT


def test_features_toggle_bits_in_features0() -> None:
    p = Profile.named("default", 2, 2 * GiB, "+dynamic-pamt,-no-rbp-mod")
    assert p.features["dynamic-pamt"] and not p.features["no-rbp-mod"]
    assert p.features0 & f.FEATURES0_DYNAMIC_PAMT
    assert not p.features0 & f.FEATURES0_NO_RBP_MOD
    assert Profile.named("dpamt", 2, 2 * GiB, "-dynamic-pamt").features0 & (
        f.FEATURES0_DYNAMIC_PAMT) == 0
    assert p.with_features("") is p


def test_every_feature_name_maps_to_a_profile_field() -> None:
    p = Profile()
    for name, attr in FEATURES.items():
        assert isinstance(getattr(p, attr), bool), name


@pytest.mark.parametrize("spec,msg", [("+dpamt", "unknown feature 'dpamt'"),
                                      ("dynamic_pamt", "unknown feature 'dynamic_pamt'")])
def test_unknown_feature_is_one_readable_error(spec: str, msg: str) -> None:
    with pytest.raises(VtdxError, match=msg) as e:
        Profile.named("default", 2, 2 * GiB, spec)
    assert "dynamic-pamt" in str(e.value) and "\n" not in str(e.value)


def test_unknown_profile_is_one_readable_error() -> None:
    with pytest.raises(VtdxError, match="unknown profile 'fast'.*default, dpamt, no-movdir64b"):
        Profile.named("fast", 2, 2 * GiB)


def test_refusal_profiles_lack_what_linux_needs() -> None:
    assert not Profile.named("no-movdir64b", 2, 2 * GiB).movdir64b
    assert Profile.named("one-keyid", 2, 2 * GiB).tdx_keyids == 1
