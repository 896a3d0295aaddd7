"""The plugin's options: the session's own flags, the check options' flags and ini twins (from the
option table, :data:`pytest_gradckpt.spec.OPTIONS`), and how a check's options are layered:
marker first, then command line, then ini.
"""

from __future__ import annotations

from typing import Any

import pytest

from pytest_gradckpt.errors import GradckptUsageError
from pytest_gradckpt.plugin.session import GradckptSession
from pytest_gradckpt.spec import FLAGS, OPTION, OPTIONS, Flag

#: The session's own flags (what to run and where results go); the check options' flags are the
#: option table's (:data:`pytest_gradckpt.spec.FLAGS`).
SESSION_FLAGS: tuple[Flag, ...] = (
    Flag("--gradckpt", "run gradient-checkpointing checks (marked tests, fixtures, generated items)", ini_type="bool"),
    Flag("--gradckpt-model", "generate checks for a factory returning (model, inputs[, loss]); repeatable",
         "MODULE:FACTORY", ini_type="linelist"),
    Flag("--gradckpt-models", "comma-separated built-in zoo entries for the packaged suite (default: the "
         "representative subset; 'all')", "NAMES"),
    Flag("--gradckpt-report", "write every result as JSON to PATH", "PATH"),
    Flag("--gradckpt-record", "write a golden record (outcomes + loss, gradient norms, activation bytes + versions) "
         "to PATH", "PATH"),
    Flag("--gradckpt-compare", "fail every check whose outcome or numbers changed since the golden record at PATH",
         "PATH"),
    Flag("--gradckpt-bisect", "exit codes for 'git bisect run': 0 good, 1 bad, 125 when the code under test cannot "
         "be imported", ini_type="bool"),
    Flag("--gradckpt-update-expected", "packaged suite: write this run's verdicts as the installed transformers "
         "line's expectations, for review", ini_type="bool"),
)

#: ``check_options`` key for --gradckpt-compile-order (validated at configure), resolved per model by run_check.
SESSION_COMPILE_ORDER = "session_compile_order"


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("gradckpt", "gradient checkpointing checks (pytest-gradckpt)")
    for flag in (*SESSION_FLAGS, *FLAGS):
        group.addoption(flag.flag, dest=flag.ini, help=flag.help, **flag.addoption_keywords())
        parser.addini(flag.ini, f"{flag.help} (ini twin of {flag.flag})", type=flag.ini_type,
                      default=False if flag.ini_type == "bool" else None)


def option(config: pytest.Config, name: str) -> Any:
    """A setting from the command line if given there, else from the ini file."""
    value = config.getoption(name)
    if value is None or value == []:
        value = config.getini(name)
    return value if value not in ("", []) else None


def enabled(config: pytest.Config) -> bool:
    return bool(option(config, "gradckpt"))


def usage(error: GradckptUsageError) -> pytest.UsageError:
    return pytest.UsageError(f"pytest-gradckpt: {error}")


def add_notice(config: pytest.Config, line: str) -> None:
    """Open the gradckpt report (terminal summary and JSON) with ``line``."""
    GradckptSession.of(config).notices.append(line)


def flag_value(config: pytest.Config, name: str) -> Any:
    """Option ``name``'s session-wide value from its flag (or the flag's ini twin), validated by the
    option's one validator; None when not set."""
    flag = OPTION[name].flag
    assert flag is not None, name
    raw = option(config, flag.ini)
    if raw is None:
        return None
    try:
        return OPTION[name].validate(flag.parse(raw, flag.flag), flag.flag)
    except GradckptUsageError as error:
        raise usage(error) from None


def session_check_values(config: pytest.Config) -> dict[str, Any]:
    """The check options set for the whole session by flags or ini, validated (at configure).
    Strategies wait for collection (a conftest may register some); ``compile_order`` is a default
    for models with compiled blocks only (:func:`~pytest_gradckpt.plugin.checks.run_check`)."""
    values = {o.name: flag_value(config, o.name) for o in OPTIONS if o.flag is not None and o.name != "strategies"}
    return {name: value for name, value in values.items() if value is not None}


def selected_strategies(config: pytest.Config, marker_settings: dict[str, Any]) -> list[str] | None:
    """The strategies a test runs: the marker's, else ``--gradckpt-strategies`` (None: every registered one)."""
    if marker_settings.get("strategies"):
        return list(marker_settings["strategies"])
    chosen = flag_value(config, "strategies")
    return None if chosen is None else list(chosen)


def check_options(config: pytest.Config, marker: dict[str, Any], strategies: list[str] | None) -> dict[str, Any]:
    """The check's options by name (a :class:`~pytest_gradckpt.spec.CheckSpec` is built from them):
    marker first, then options, then ini. Steps run isolated where that is cheap (``isolate="auto"``):
    a crash never ends the session."""
    chosen = {k: v for k, v in marker.items() if k != "expect"}
    chosen.setdefault("isolate", "auto")
    chosen["fingerprint"] = bool(option(config, "gradckpt_record") or option(config, "gradckpt_compare"))
    chosen["strategies"] = strategies
    for name, value in GradckptSession.of(config).check_values.items():
        if name == "compile_order":
            if name not in chosen:  # a session-wide default: run_check applies it to models with compiled blocks only
                chosen[SESSION_COMPILE_ORDER] = value
        else:
            chosen.setdefault(name, value)
    return chosen


@pytest.hookimpl(tryfirst=True)
def pytest_cmdline_main(config: pytest.Config) -> int | None:
    """``--gradckpt-strategies=help``: list the registered strategies (conftest registrations
    included) with what each does, and exit, as ``--fixtures`` does."""
    if option(config, "gradckpt_strategies") != "help":
        return None
    print(strategies_help())
    return 0


def strategies_help() -> str:
    """One line per registered strategy: its name and description; those that run only when
    named (``compile_budget``, ``sac_offload``, ...) say so.

    Example:
        >>> print(strategies_help().splitlines()[1])
          reentrant  torch.utils.checkpoint per layer, use_reentrant=True
        >>> sorted(line.split()[0] for line in strategies_help().splitlines() if "opt-in" in line)
        ['compile_budget', 'hf_every_2', 'hf_offload', 'sac_offload']
    """
    from pytest_gradckpt.strategies import available_strategies, get_strategy

    names = available_strategies(opt_in=True)
    width = max(map(len, names))
    lines = [f"  {name:<{width}}  {get_strategy(name).description}"
             + (" (opt-in: runs only when named)" if get_strategy(name).opt_in else "")
             for name in names]
    return "\n".join(["strategies (pass names to --gradckpt-strategies or @pytest.mark.gradckpt(strategies=...)):",
                      *lines])
