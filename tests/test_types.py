"""The typed parameters and handler signatures (kumo_listener.types) against
the core's table, and mypy flagging a policy's mistakes with them."""

from __future__ import annotations

import textwrap
from pathlib import Path

from kumo_listener import _core
from kumo_listener.types import (
    Authentication,
    ForwardOptions,
    ListenerParameters,
    OverrideParameters,
)
from mypy import api as mypy_api


def test_the_typed_dicts_have_every_parameter_of_the_core_in_its_place():
    scopes = dict(_core.PARAMETERS)
    anywhere = {name for name, scope in scopes.items() if scope == "anywhere"}
    assert set(OverrideParameters.__annotations__) == anywhere
    assert set(ListenerParameters.__annotations__) | anywhere == set(scopes)
    assert set(ListenerParameters.__optional_keys__) == set(scopes)
    assert set(ForwardOptions.__annotations__) == set(_core.FORWARD_OPTIONS)
    assert set(Authentication.__annotations__) == set(_core.AUTHENTICATION_FIELDS)


POLICY = """
    import kumo_listener as kumo
    from kumo_listener.types import OverrideParameters

    @kumo.on("init")
    def init() -> None:
        kumo.start_esmtp_listener(
            listen="127.0.0.1:0", {param}, via={{"127.0.0.2": {{"banner": "x"}}}}
        )

    def dynamic(listener: str, conn_meta: kumo.ConnectionMeta) -> OverrideParameters:
        return {{"hostname": "mx.example", {override}}}

    handler: kumo.types.GetDynamicParameters = dynamic
"""


def mypy_on(tmp_path: Path, param: str, override: str) -> tuple[int, str]:
    policy = tmp_path / "policy.py"
    policy.write_text(textwrap.dedent(POLICY.format(param=param, override=override)))
    out, err, status = mypy_api.run(
        ["--no-incremental", "--cache-dir", str(tmp_path / "cache"), str(policy)]
    )
    return status, out + err


def test_a_correct_policy_passes_mypy(tmp_path):
    status, output = mypy_on(tmp_path, 'max_message_size="10 MiB"', '"banner": "hi"')
    assert status == 0, output


def test_mypy_flags_a_misspelled_parameter(tmp_path):
    status, output = mypy_on(tmp_path, 'max_mesage_size="10 MiB"', '"banner": "hi"')
    assert status == 1
    assert 'Unexpected keyword argument "max_mesage_size"' in output, output


def test_mypy_flags_a_wrong_value_and_a_misspelled_override(tmp_path):
    status, output = mypy_on(tmp_path, 'batch_handling="PerDomain"', '"banerr": "hi"')
    assert status == 1
    assert "batch_handling" in output, output
    assert '"banerr"' in output, output
