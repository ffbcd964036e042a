"""Runs the checks for one model_type: source config -> variants -> tiny checkpoints ->
both models -> check results. The CLI, the worker and the sweep all call `verify`."""

from __future__ import annotations

import fnmatch
import importlib
import json
import logging
import platform
import re
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from . import compat, sources, synth
from .mlx_side import MlxLmError, MlxLmInfo, blas_library
from .schema import CheckResult, Environment, ModelReport, Reach, Variant, Verdict, combine_verdicts
from .sources import Source
from .subject import Subject

PARITY_TOKENS = 48


class InputError(Exception):
    """Bad input: the run cannot start (exit 2)."""


def environment(mlx_lm: MlxLmInfo) -> Environment:
    import mlx.core as mx
    import torch
    import transformers

    from . import __version__

    return Environment(
        python=platform.python_version(),
        platform=platform.platform(),
        machine=platform.machine(),
        mlx=mx.__version__,
        mlx_device=str(mx.default_device()),
        torch=torch.__version__,
        transformers=transformers.__version__,
        mlx_lm_version=mlx_lm.version,
        mlx_lm_path=mlx_lm.path,
        mlx_lm_git_sha=mlx_lm.git_sha,
        mlx_verify=__version__,
        blas=blas_library(),
        lock=compat.lock_in_use(),
    )


def resolve_sources(model_type: str, config_file: str | None = None,
                    given: list[Source] | None = None) -> list[Source]:
    """The configurations to check: given sources, a config file, or transformers' default."""
    try:
        if given:
            found = list(given)
        elif config_file is not None:
            found = [sources.from_config_file(config_file)]
        else:
            found = [Source(name="transformers default config",
                            config=synth.default_config(model_type), from_file=False)]
    except (sources.SourceError, synth.SynthError) as e:
        raise InputError(str(e)) from e
    for source in found:
        if source.config["model_type"] != model_type:
            raise InputError(f"{source.name}: model_type is {source.config['model_type']!r}, "
                             f"not {model_type!r}")
    return found


def source_config(model_type: str, config_file: str | None) -> tuple[dict[str, Any], str]:
    source = resolve_sources(model_type, config_file)[0]
    return source.config, source.name


def make_variants(source: dict[str, Any], from_file: bool) -> list[Variant]:
    """The configurations to check. A config file keeps its own format; transformers'
    default config is written in the legacy format most Hub checkpoints carry, unless
    the architecture has none (transformers refuses it, or the port reads only
    `rope_parameters`: its checkpoints were all written by transformers 5)."""
    if from_file:
        tiny = synth.shrink_config(source)
        return [Variant(name="default", description="source config, sizes shrunk",
                        config_format=synth.config_format(tiny), config=tiny)]
    # keys transformers' default lacks and real checkpoints carry, each with its source
    source, completed = synth.complete_default_config(source)
    said = "".join(f"; {key} completed: {item['source']}" for key, item in completed.items())
    overrides = {"completed": completed} if completed else {}
    tiny = synth.shrink_config(source)
    fmt = synth.config_format(tiny)
    legacy = synth.to_legacy_format(tiny)
    nested = synth.text_config_to_legacy(legacy)
    if nested is not None and _unreadable(legacy) and not _unreadable(nested):
        # the port reads the legacy RoPE keys in text_config only (llama4); ports that
        # read text_config's rope_parameters (qwen3_5) keep them
        legacy = nested
    if not synth.port_reads_rope_parameters_only(tiny) and synth.legacy_is_lossless(tiny, legacy):
        return [Variant(name="default",
                        description="transformers default config, sizes shrunk, "
                                    "legacy format (top-level RoPE keys, Hub key names)" + said,
                        config_format=synth.config_format(legacy), config=legacy,
                        overrides=overrides)]
    # rope_parameters kept, with the Hub key names where those are lossless
    named = synth.hub_key_names(tiny)
    return [Variant(name="default",
                    description="transformers default config, sizes shrunk, "
                                "transformers 5 format (no legacy form for this architecture)"
                                + said,
                    config_format=fmt, overrides=overrides,
                    config=named if synth.legacy_is_lossless(tiny, named) else tiny)]


def _unreadable(config: dict[str, Any]) -> bool:
    from .mlx_side import config_problem

    try:
        return config_problem(config) is not None
    except MlxLmError:
        return True


def all_variants(model_type: str, source: dict[str, Any], from_file: bool,
                 names: tuple[str, ...] | None = None) -> list[Variant]:
    """The default variant, then the bug-finding ones (checks/variants.py); `names` filters."""
    from . import variants

    default = make_variants(source, from_file)[0]
    if default.config_format == "rope_parameters":
        legacy = synth.to_legacy_format(default.config)
        # a port that reads rope_parameters only was written for checkpoints transformers
        # 5 saved (GLM-5): no checkpoint of it is in the legacy format
        other = (legacy if synth.legacy_is_lossless(default.config, legacy)
                 and not synth.port_reads_rope_parameters_only(default.config) else None)
    else:
        try:
            other = variants.to_rope_parameters_format(default.config)
        except Exception as e:
            raise InputError(f"transformers cannot write {model_type}'s config in its own "
                             f"format: {synth._one_line(e)}") from e
    found = [default, *variants.bug_finding_variants(model_type, default, other)]
    if names is None:
        return found
    unknown = set(names) - {v.name for v in found}
    if unknown:
        raise InputError(f"{model_type} has no variant(s) {', '.join(sorted(unknown))}; "
                         f"available: {', '.join(v.name for v in found)}")
    return [v for v in found if v.name in names]


def source_variants(model_type: str, found: list[Source], names: tuple[str, ...] | None,
                    full_weights: bool, strict: bool = True) -> list[Variant]:
    """The first source's variants, then one tiny checkpoint per further distinct config
    (`source-N`), then the real checkpoints when full weights are asked for."""
    first = found[0]
    out = all_variants(model_type, first.config, first.from_file)
    out[0].description = f"{first.name}: {out[0].description}"
    seen = {json.dumps(out[0].config, sort_keys=True)}
    for index, source in enumerate(found[1:], start=1):
        variant = make_variants(source.config, from_file=True)[0]
        key = json.dumps(variant.config, sort_keys=True)
        if key in seen:
            continue  # same tiny config as an earlier source: nothing new to check
        seen.add(key)
        variant.name = f"source-{index}"
        variant.description = f"{source.name}: sizes shrunk"
        out.insert(index, variant)
    if full_weights:
        for index, source in enumerate(found):
            if source.checkpoint is None:
                raise InputError(f"{source.name}: no weights to run with --full-weights")
            out.append(Variant(name=f"full-weights-{index}", description=f"{source.name}: "
                               "the real weights", config_format=synth.config_format(
                                   source.config), config=source.config,
                               checkpoint_dir=str(source.checkpoint)))
    if names is None:
        return out
    unknown = set(names) - {v.name for v in out}
    if unknown and strict:
        raise InputError(f"{model_type} has no variant(s) {', '.join(sorted(unknown))}; "
                         f"available: {', '.join(v.name for v in out)}")
    return [v for v in out if v.name in names]


Progress = Callable[[str], None]


# check name -> module defining `run(subject) -> list[CheckResult]`
CHECK_MODULES = {
    "layers": "mlx_verify.checks.layers",
    "rope": "mlx_verify.checks.rope",
    "config": "mlx_verify.checks.config_keys",
    "weights": "mlx_verify.checks.weights",
    "dtype": "mlx_verify.checks.dtypes",
    "generation": "mlx_verify.checks.generation",
    "long": "mlx_verify.checks.long_context",
    "quantize": "mlx_verify.checks.quantize",
}
ALL_CHECKS = tuple(CHECK_MODULES)


def applies(check: str, variant: str) -> bool:
    """Which variants a check runs on: parity on all of them, the rest on the default."""
    if check == "layers":
        return True
    if check == "rope":
        return variant == "default" or variant.startswith(("rope", "source-", "full-weights"))
    if check == "config":
        return variant == "default" or variant.startswith("config-format")
    if check == "long":
        return variant in ("default", "sliding-window")
    if check == "generation":  # head-dim: the quantized KV cache part only (generation.py)
        return variant in ("default", "head-dim")
    if check == "weights":
        # tied checkpoints with lm_head.weight present are tested where tying is on, the
        # default's or the tied variant's (granite before d39cfec1: default untied)
        return variant in ("default", "tied-embeddings")
    return variant == "default"


def verify(model_type: str, *, config_file: str | None = None, checks: tuple[str, ...] = ALL_CHECKS,
           dtype: str = "float32", seed: int = 0, progress: Progress | None = None,
           variant_names: tuple[str, ...] | None = None, given: list[Source] | None = None,
           full_weights: bool = False, strict_variants: bool = True) -> ModelReport:
    """Run the checks; bad input raises InputError or MlxLmError, findings are verdicts.

    With strict_variants off (several model types in one run), a named variant this
    model_type does not have is recorded as a skip instead of being an error."""
    from . import hf_side, mlx_side

    say = progress or (lambda message: None)
    found = resolve_sources(model_type, config_file, given)
    if compat.hf_model_class_name(model_type) is None:
        # transformers' model_type of this name is no text model (pixtral: a vision
        # encoder): nothing on the transformers side to hold mlx-lm to
        raise InputError(f"transformers has no causal LM or image-text-to-text model for "
                         f"model_type {model_type!r}: nothing to compare mlx-lm with")
    report = ModelReport(model_type=model_type, source="; ".join(f.name for f in found),
                         seed=seed, dtype=dtype, verdict="skip",
                         config_diff=sources.config_diff(found))
    try:
        report.variants = source_variants(model_type, found, variant_names, full_weights,
                                          strict_variants)
        for name in sorted(set(variant_names or ()) - {v.name for v in report.variants}):
            report.checks.append(CheckResult(check="layers", variant=name, verdict="skip",
                                             summary=f"not applicable: {model_type} has no "
                                                     f"variant {name}"))
    except InputError:
        raise
    except Exception as e:
        raise InputError(f"cannot shrink the config: {synth._one_line(e)}") from e

    default_weights: Any = None
    # why the default variant measured nothing (it does not load, build or run); then
    # the first variant that loads and passes `layers` runs the default's checks too (one
    # finding must not hide the rest), its rows saying so
    default_not_measured: str | None = None
    stand_in: str | None = None

    def blocked(variant: str, verdict: Verdict, side: str, summary: str, why: str,
                **fields: Any) -> None:
        """The layers row saying why this variant stops here (and whose side failed), then
        a skip row for every other check that would have run on it."""
        nonlocal default_not_measured
        report.checks.append(CheckResult(check="layers", variant=variant, verdict=verdict,
                                         summary=summary, details={"side": side}, **fields))
        report.checks.extend(not_run(checks, variant, why))
        if variant == "default":
            default_not_measured = why

    for variant in report.variants:
        start = time.perf_counter()
        try:
            problem = mlx_side.config_problem(variant.config)
        except MlxLmError as e:
            if not isinstance(e.__cause__, SystemExit):
                raise  # the tree cannot be used (syntax error, bad import): bad input
            # released olmo.py exits when a package transformers does not need is missing
            blocked(variant.name, "fail", "mlx-lm", str(e),
                    "mlx-lm's model file exits at import", first_divergent_layer="import")
            continue
        if problem is not None and synth._cannot_build(variant.config):
            # transformers' own model cannot be built from it either (lfm2_moe's default
            # without layer_types): the config is the broken side, not mlx-lm
            blocked(variant.name, "error", "transformers",
                    f"transformers cannot build its own model from this config, and mlx-lm "
                    f"cannot read it ({problem}): nothing to compare",
                    "transformers cannot build the model")
            continue
        if problem is not None:
            # measured: transformers reads this config, mlx-lm's ModelArgs does not
            blocked(variant.name, "fail", "mlx-lm",
                    f"mlx-lm cannot read this variant's config: {problem}",
                    "mlx-lm cannot read its config", first_divergent_layer="config")
            continue
        say(f"{model_type}/{variant.name}: synthesizing tiny checkpoint")
        try:
            if variant.name.startswith("full-weights"):
                checkpoint = Path(variant.checkpoint_dir or "")
            else:
                checkpoint = synth.write_checkpoint(variant.config, seed, dtype="float32")
        except synth.SynthError as e:
            if variant.name != "default":
                # transformers does not support this setting for this architecture
                report.checks.append(CheckResult(
                    check="layers", variant=variant.name, verdict="skip",
                    summary=f"not applicable: {e}"))
                continue
            raise InputError(f"{found[0].name}: {e}") from e
        variant.checkpoint_dir = str(checkpoint)
        say(f"{model_type}/{variant.name}: loading transformers and MLX models")
        try:
            hf_model = hf_side.load(checkpoint, dtype=dtype)
        except Exception as e:
            blocked(variant.name, "error", "transformers",
                    f"transformers cannot load the tiny checkpoint: {synth._one_line(e)}",
                    "transformers cannot load its checkpoint")
            continue
        try:
            mlx_model, _, weights = mlx_side.load(checkpoint)
        except mlx_side.PortCrash as e:
            blocked(variant.name, "fail", "mlx-lm", str(e), "mlx-lm cannot build the model",
                    first_divergent_layer="load", duration_s=time.perf_counter() - start)
            continue
        # transformers runs its own model, or there is nothing to hold MLX to
        ids = synth.token_ids(_vocab(variant.config), PARITY_TOKENS, seed)
        try:
            hf_side.plain_forward(hf_model, ids)
        except Exception as e:
            if variant.name != "default":
                # transformers builds this setting and cannot run it: no checkpoint has it
                report.checks.append(CheckResult(
                    check="layers", variant=variant.name, verdict="skip",
                    summary=f"not applicable: transformers cannot run this variant: "
                            f"{mlx_side.describe_import_error(e)}"))
                continue
            blocked(variant.name, "error", "transformers",
                    f"transformers cannot run its own model: "
                    f"{mlx_side.describe_import_error(e)}", "transformers cannot run the model")
            continue
        loaded_as = None
        if mlx_model is None:
            failure = _weights_failure(variant.name, weights, start)
            if variant.name == "default":
                default_weights = weights
            elif weights == default_weights:
                failure.summary = f"the default variant's load finding again: {failure.summary}"
            quantized = declared_quantization(variant.name, found, weights)
            if quantized:
                # the tiny checkpoint is written unquantized (synth drops
                # quantization_config): a layout this config's own checkpoint does not have
                failure.details["reach"] = "latent"
                failure.details["facts"] = [quantized]
                failure.summary = f"{failure.summary}; latent: {quantized}"
            report.checks.append(failure)
            # Behind the finding: the model the same weights give under the naming
            # mlx-lm does read, when there is one; the checks say they ran on it.
            try:
                mlx_model, hf_model, checkpoint, loaded_as = behind_load_finding(
                    checkpoint, weights, hf_model, dtype)
            except mlx_side.PortCrash as e:
                mlx_model, loaded_as = None, f"retry failed: {e}"
            if mlx_model is None:
                why = "mlx-lm does not load its weights strictly"
                report.checks.extend(not_run(
                    checks, variant.name, why + (f" ({loaded_as})" if loaded_as else "")))
                if variant.name == "default":
                    default_not_measured = why
                continue
        if dtype != "float32":
            mlx_model.set_dtype(_mlx_dtype(dtype))
        subject = Subject(
            model_type=model_type, variant=variant, checkpoint=checkpoint,
            config=variant.config, dtype=dtype, seed=seed, hf_model=hf_model,
            mlx_model=mlx_model, ids=ids,
        )
        for check in checks:
            if applies(check, variant.name):
                say(f"{model_type}/{variant.name}: {check}")
                results = run_check(check, subject)
                if loaded_as:
                    for result in results:  # said in the row itself, not only in details
                        result.summary = f"behind the load finding: {result.summary}"
                        result.details["loaded_behind_load_finding"] = loaded_as
                report.checks.extend(results)
        # the stand-in: a variant on which MLX computes transformers' function (its layers
        # row passes), so its rows measure what the default's would, not its own finding
        parity = any(r.check == "layers" and r.variant == variant.name and r.verdict == "pass"
                     for r in report.checks)
        if default_not_measured is not None and stand_in is None and not loaded_as \
                and parity and variant.name != "head-dim":  # head-dim: part of generation
            stand_in = variant.name
            subject.stands_in = True
            for check in checks:
                if applies(check, "default") and not applies(check, variant.name):
                    say(f"{model_type}/{variant.name}: {check}, standing in for the default")
                    results = run_check(check, subject)
                    for result in results:
                        result.summary = (f"on {variant.name}, standing in for the default "
                                          f"variant ({default_not_measured}): {result.summary}")
                        result.details["stands_in_for"] = "default"
                    report.checks.extend(results)
    for result in report.checks:
        result.reach = reach_of(result)
    report.verdict = combine_verdicts([c.verdict for c in report.checks])
    return report


def reach_of(result: CheckResult) -> Reach:
    """The config under test (the default variant, a given source, its real weights, a
    variant of CONFIG_REACH_VARIANTS), or latent: a bug-finding variant, or a key the check
    perturbed (the check says so in details["reach"])."""
    from .variants import CONFIG_REACH_VARIANTS

    given = result.details.get("reach")
    if given in ("config", "latent", "systemic"):
        return given
    if result.variant == "default" or result.variant.startswith(("source-", "full-weights")):
        return "config"
    if result.variant in CONFIG_REACH_VARIANTS:
        # a size shrunk below the prompt (index-topk): the branch the config's own long
        # prompts take
        return "config"
    return "latent"


SYSTEMIC_AT = 3  # architectures failing the same latent (check, variant): one cause


def mark_systemic(reports: list[ModelReport]) -> dict[tuple[str, str], list[str]]:
    """Latent findings of one (check, variant) in SYSTEMIC_AT or more model_types are one
    cause seen across architectures (e.g. transformers 5's rope_parameters not read):
    graded systemic, each naming the others. Returns (check, variant) -> model_types."""
    failing: dict[tuple[str, str], list[str]] = {}
    for report in reports:
        for result in report.checks:
            if result.reach == "latent" and result.verdict == "fail":
                types = failing.setdefault((result.check, result.variant), [])
                if report.model_type not in types:
                    types.append(report.model_type)
    systemic = {key: types for key, types in failing.items() if len(types) >= SYSTEMIC_AT}
    for report in reports:
        for result in report.checks:
            types = systemic.get((result.check, result.variant))
            if types and result.reach == "latent" and result.verdict == "fail":
                result.reach = "systemic"
                result.details["systemic_with"] = types
    return systemic


# tensors no weight quantization method stores differently (kept in full precision)
NOT_QUANTIZED = re.compile(r"bias|norm|sink|embed|lm_head|router|gate\.weight$")


def declared_quantization(variant: str, found: list[Source], weights: Any) -> str | None:
    """The fact, when the source config behind this variant declares a quantized checkpoint
    (gpt-oss: MXFP4 experts) and every tensor of the load finding is one that quantization
    stores in another layout. The tiny checkpoint is written unquantized, so such a
    finding is about the unquantized layout transformers saves (fine-tunes, dequantized
    copies), not about the checkpoint this config describes. A norm, bias or sink, or a
    module the config keeps unquantized (`modules_to_not_convert`), stays the config's."""
    if variant == "default":
        source = found[0]
    elif variant.startswith("source-") and variant[len("source-"):].isdigit():
        source = found[int(variant[len("source-"):])]
    else:
        return None
    quantization = source.config.get("quantization_config")
    if not source.from_file or not isinstance(quantization, dict):
        return None
    kept = [pattern for pattern in quantization.get("modules_to_not_convert") or []
            if isinstance(pattern, str)]
    names = [*weights.missing, *weights.unexpected,
             *(entry.split(":")[0] for entry in weights.mismatched)]
    if not names or any(NOT_QUANTIZED.search(name)
                        or any(fnmatch.fnmatch(name, f"{p}*") for p in kept) for name in names):
        return None
    method = quantization.get("quant_method", "unnamed")
    return (f"this config's checkpoint is quantized (quantization_config quant_method "
            f"{method!r}); the tiny checkpoint is written unquantized, a layout this "
            "checkpoint does not have")


def not_run(checks: tuple[str, ...], variant: str, why: str) -> list[CheckResult]:
    """A skip row for every check (other than layers, which holds the finding) that
    would have run on this variant: what was not measured, and why."""
    return [CheckResult(check=check, variant=variant, verdict="skip", summary=f"not run: {why}")
            for check in checks if check != "layers" and applies(check, variant)]


def behind_load_finding(checkpoint: Path, weights: Any, hf_model: Any, dtype: str
                        ) -> tuple[Any, Any, Path, str | None]:
    """(mlx_model, hf_model, checkpoint, how) for the checks behind a weights load finding,
    mlx_model None when nothing can be loaded:
    - only unexpected tensors (every parameter of the MLX model is in the checkpoint):
      mlx-lm's loader with strict=False, which drops them;
    - the checkpoint's tensors under another top-level prefix (gpt2: transformers saves
      `transformer.h.0...`, the original Hub checkpoints and the port use `h.0...`):
      a copy of the checkpoint with that prefix removed, which transformers loads too
      (its base-model prefix) and both sides then run."""
    from . import compat, hf_side, mlx_side

    if not weights.missing and not weights.mismatched:
        model, _ = compat.mlx_load_model(checkpoint, strict=False)
        return model, hf_model, checkpoint, (f"mlx-lm's loader with strict=False: "
                                             f"{len(weights.unexpected)} unexpected tensor(s) "
                                             "dropped")
    prefix = f"{getattr(hf_model, 'base_model_prefix', '') or 'model'}."
    copy_dir = synth.without_key_prefix(checkpoint, prefix)
    if copy_dir is None:
        return None, hf_model, checkpoint, None
    model, _, again = mlx_side.load(copy_dir)
    if model is None:
        return None, hf_model, checkpoint, (f"nor with the prefix {prefix!r} removed: "
                                            f"{len(again.missing)} missing, "
                                            f"{len(again.unexpected)} unexpected")
    try:
        hf_renamed = hf_side.load(copy_dir, dtype=dtype)
    except Exception as e:  # transformers does not take the renamed copy: not comparable
        return None, hf_model, checkpoint, (f"transformers does not load the copy without "
                                            f"{prefix!r}: {synth._one_line(e)}")
    return model, hf_renamed, copy_dir, (f"the checkpoint's tensors without their {prefix!r} "
                                         "prefix (mlx-lm loads that naming strictly)")


def run_check(check: str, subject: Subject) -> list[CheckResult]:
    """One check on one subject; a crash inside it is an `error` verdict, not a crash."""
    from . import mlx_side

    start = time.perf_counter()
    # Library warnings are part of the measurement's record, not noise to hide: a
    # deprecation is how a release announces the change that would move a verdict.
    with warnings.catch_warnings(record=True) as caught, library_log() as logged:
        warnings.simplefilter("always")
        try:
            results = importlib.import_module(CHECK_MODULES[check]).run(subject)
        except MlxLmError:
            raise
        except compat.DriverError as e:
            results = [subject.result(check, verdict="error", summary=str(e))]
        except Exception as e:
            side = raised_in(e)
            if side == "mlx-lm":
                # the port raises on a model transformers runs (checked at load): a finding
                results = [subject.result(check, verdict="fail", details={"side": side},
                                          summary=f"mlx-lm raises while running the model: "
                                                  f"{mlx_side.describe_import_error(e)}")]
            else:
                results = [subject.result(check, verdict="error", details={"side": side},
                                          summary=f"{check} failed to run: "
                                                  f"{mlx_side.describe_import_error(e)}")]
        # where transformers reads the config other than literally, failing rows say so
        from .config_keys import label_by_reading

        label_by_reading(subject, results)
    seen = list(dict.fromkeys(
        [f"{w.category.__name__}: {str(w.message).splitlines()[0][:200]}"
         f" ({Path(w.filename).name}:{w.lineno})" for w in caught] + logged))
    for result in results:
        if not result.duration_s:
            result.duration_s = time.perf_counter() - start
        if seen:
            result.details["warnings"] = seen[:20]
    return results


def raised_in(e: BaseException) -> str:
    """Which side's code raised: the innermost traceback frame in mlx_lm's, transformers'
    or our own package ("mlx-verify"), "unknown" when none is."""
    side = "unknown"
    tb = e.__traceback__
    while tb is not None:
        parts = Path(tb.tb_frame.f_code.co_filename).parts
        if "mlx_lm" in parts:
            side = "mlx-lm"
        elif "transformers" in parts:
            side = "transformers"
        elif "checks" in parts and "mlx_lm" not in parts:
            side = "mlx-verify"
        tb = tb.tb_next
    return side


@contextmanager
def library_log() -> Iterator[list[str]]:
    """transformers' logged warnings during a check, taken from its stderr handler into a
    list (the results keep them)."""
    logger = logging.getLogger("transformers")
    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            text = re.sub(r"\x1b\[[0-9;]*m", "", record.getMessage()).splitlines()[0]
            records.append(f"transformers log: {text[:200]}")

    handlers, level = list(logger.handlers), logger.level
    keep = Keep(logging.WARNING)
    logger.handlers = [keep]
    logger.setLevel(logging.WARNING)
    try:
        yield records
    finally:
        logger.handlers, logger.level = handlers, level


def _weights_failure(variant: str, weights: Any, start: float) -> CheckResult:
    counts = (f"{len(weights.missing)} missing, {len(weights.unexpected)} unexpected, "
              f"{len(weights.mismatched)} mis-shaped")
    first = (weights.missing or weights.unexpected or weights.mismatched)[0]
    return CheckResult(
        check="layers", variant=variant, verdict="fail",
        summary=f"weights do not load strictly: {counts} (first: {first})",
        weights=weights, first_divergent_layer="load",
        duration_s=time.perf_counter() - start,
        metrics={"missing": len(weights.missing), "unexpected": len(weights.unexpected),
                 "mismatched": len(weights.mismatched)},
    )


def _vocab(config: dict[str, Any]) -> int:
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
    return int(config.get("vocab_size") or text.get("vocab_size") or synth.VOCAB)


def _mlx_dtype(name: str) -> Any:
    import mlx.core as mx

    return getattr(mx, name)


def command_line() -> str:
    return " ".join(["mlx-verify", *sys.argv[1:]])


def shared_model_types() -> list[tuple[str, str]]:
    """(model_type, mlx_lm module) for every model_type both libraries know."""
    import mlx_lm

    from . import compat

    models_dir = Path(mlx_lm.__file__).parent / "models"
    files = {p.stem for p in models_dir.glob("*.py") if not p.stem.startswith("_")}
    remapped = compat.mlx_remapping()
    mlx_types = {t: t for t in files} | {k: v for k, v in remapped.items() if v in files}
    known = compat.hf_known_model_types()
    return sorted((t, mlx_types[t]) for t in mlx_types if t in known)


def probe(model_type: str) -> str:
    """'yes', or 'no: <reason>' after building the tiny checkpoint and loading both models."""
    from . import hf_side, mlx_side

    try:
        source, _ = source_config(model_type, None)
        variant = make_variants(source, from_file=False)[0]
        checkpoint = synth.write_checkpoint(variant.config, 0)
        hf_side.load(checkpoint)
        model, _, weights = mlx_side.load(checkpoint)
    except Exception as e:
        return f"no: {synth._one_line(e)[:120]}"
    if model is None:
        return (f"no: weights do not load ({len(weights.missing)} missing, "
                f"{len(weights.unexpected)} unexpected, {len(weights.mismatched)} mis-shaped)")
    return "yes"


def load_subject(model_type: str, variant_name: str = "default", *, config_file: str | None = None,
                 dtype: str = "float32", seed: int = 0) -> Subject:
    """One variant loaded on both sides, for running a single check (tests, benchmarks)."""
    from . import hf_side, mlx_side

    source, _ = source_config(model_type, config_file)
    variants = {v.name: v for v in all_variants(model_type, source, config_file is not None)}
    if variant_name not in variants:
        raise InputError(f"{model_type} has no variant {variant_name!r}: {', '.join(variants)}")
    variant = variants[variant_name]
    checkpoint = synth.write_checkpoint(variant.config, seed)
    variant.checkpoint_dir = str(checkpoint)
    mlx_model, _, weights = mlx_side.load(checkpoint)
    if mlx_model is None:
        raise InputError(f"{model_type}/{variant_name}: weights do not load: {weights}")
    if dtype != "float32":
        mlx_model.set_dtype(_mlx_dtype(dtype))
    return Subject(
        model_type=model_type, variant=variant, checkpoint=checkpoint, config=variant.config,
        dtype=dtype, seed=seed, hf_model=hf_side.load(checkpoint, dtype=dtype),
        mlx_model=mlx_model, ids=synth.token_ids(_vocab(variant.config), PARITY_TOKENS, seed),
    )


def calibration_runs(model_types: list[str], seeds: list[int],
                     run: Callable[[Subject], list[CheckResult]]
                     ) -> Iterator[tuple[str, int, list[CheckResult] | None, str | None]]:
    """(model_type, seed, results, problem) of one check over ports, for calibrating its
    bounds; problem says why a port gave no results (it does not load, the check raised)."""
    for model_type in model_types:
        for seed in seeds:
            try:
                subject = load_subject(model_type, seed=seed)
            except Exception as e:  # not a port both libraries load: nothing to calibrate
                yield model_type, seed, None, f"not loaded: {str(e)[:200]}"
                continue
            try:
                yield model_type, seed, run(subject), None
            except Exception as e:  # the engine reports this as an error verdict
                yield model_type, seed, None, f"error: {str(e)[:200]}"
