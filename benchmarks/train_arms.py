"""The arms of ``bench_train.py`` and how each is measured; runs inside a worker process.

An arm trains a randomly initialised Llama-shaped model with DPO on synthetic pairs of fixed
lengths (one token per character, no padding; half prompt, or the shape's ``prompt_fraction``),
bf16 with gradient checkpointing on a GPU (float32 on CPU). The arms:

- ``trl``: TRL's ``DPOTrainer`` with its default fused LM head (``trl/kernels/chunked_logprob.py``).
- ``trl-liger``: the same with ``use_liger_kernel=True`` (TRL 1.16 applies Liger's layer kernels,
  RMSNorm/RoPE/SwiGLU, and keeps its own fused LM head).
- ``fast``: ``dpo_fast.integrations.trl.FastDPOTrainer`` (TRL's loop, dpo_fast's head and loss),
  with its default TRL token metrics (from the fused pass).
- ``fast-nometrics``: the same with ``token_metrics=False``.
- ``fast-shared``: ``fast`` with ``prefix_sharing=True`` (each pair's prompt runs once).
- ``dpo-fast-cli``: the lean trainer, ``dpo-fast train`` in its own process (``run_cli``).
- ``dpo-fast-cli-shared``: the same with ``prefix_sharing: true``.

Measured: the median step time after warm-up, tokens per second (every token of the batch as TRL
counts it, each pair's prompt twice, whether or not it is shared), peak memory (on a GPU:
``torch.cuda.max_memory_allocated`` in-process, and every arm's process total sampled from
``nvidia-smi`` every 0.2 s, the only number for the CLI; on CPU: the process's peak resident set
during training, ``VmHWM``, and for in-process arms its growth over the resident set when training
starts), and the longest sequence (one pair) and largest batch (pairs at the timing length) that
train without running out of memory, by doubling and then bisecting once.
"""

from __future__ import annotations

import copy
import gc
import itertools
import json
import os
import random
import shutil
import statistics
import string
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

MODELS = {
    # Llama-3.2-1B's shape (tied embeddings, vocabulary 128,256)
    "llama-1b": dict(
        vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
        num_key_value_heads=8, head_dim=64, max_position_embeddings=131072, rope_theta=500000.0,
        tie_word_embeddings=True,
    ),
    # Llama-3.2-3B's shape
    "llama-3b": dict(
        vocab_size=128256, hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
        num_key_value_heads=8, head_dim=128, max_position_embeddings=131072, rope_theta=500000.0,
        tie_word_embeddings=True,
    ),
    # the CPU smoke test's
    "tiny": dict(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=True,
    ),
    # CPU: a tiny Llama whose head (a 32000-token vocabulary) is most of the work, for the token metrics' cost
    "tiny-32k": dict(
        vocab_size=32000, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=True,
    ),
    # CPU: 41.6M parameters (25.2M in the decoder layers, a tied 32000 x 512 embedding), for prefix sharing
    "llama-40m": dict(
        vocab_size=32000, hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
        num_key_value_heads=4, head_dim=64, max_position_embeddings=4096, tie_word_embeddings=True,
    ),
}  # fmt: skip
ARMS = ("trl", "trl-liger", "fast", "fast-nometrics", "fast-shared", "dpo-fast-cli", "dpo-fast-cli-shared")
IN_PROCESS_ARMS = ("trl", "trl-liger", "fast", "fast-nometrics", "fast-shared")
CLI_ARMS = ("dpo-fast-cli", "dpo-fast-cli-shared")
_LETTERS = string.ascii_lowercase


@dataclass(frozen=True)
class Shape:
    """One batch shape: ``pairs`` chosen/rejected pairs of ``length`` tokens, the first ``prompt_fraction`` prompt."""

    pairs: int
    length: int
    prompt_fraction: float = 0.5

    @property
    def prompt(self) -> int:
        return int(self.length * self.prompt_fraction)

    @property
    def completion(self) -> int:
        """Completion tokens, its end-of-sequence token included."""
        return self.length - self.prompt

    @property
    def tokens(self) -> int:
        return 2 * self.pairs * self.length


@dataclass(frozen=True)
class Plan:
    """What a worker measures for one model and its arms; ``deadline`` is a ``time.time()``."""

    model: str
    arms: tuple[str, ...]
    timing: Shape
    warmup_steps: int
    timed_steps: int
    search_lengths: tuple[int, ...]  # candidate sequence lengths for one pair, ascending
    search_pairs: tuple[int, ...]  # candidate batch sizes at the timing length, ascending
    deadline: float
    device: str
    result_path: str


# ----------------------------------------------------------------------------------------------
# data, tokenizer, models


def tokenizer(folder: Path | None = None):
    """One token per lowercase letter, with ``</s>`` and ``<pad>``: sequence lengths are exact."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(["<pad>", "</s>", "<unk>", *_LETTERS])}
    fast = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>")),
        eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
    )  # fmt: skip
    if folder is not None:
        fast.save_pretrained(folder)
    return fast


def preference_rows(shape: Shape, rows: int, seed: int = 0) -> list[dict]:
    """Rows of random letters: prompt of ``shape.prompt`` tokens, completions of ``shape.completion - 1``
    (TRL appends the end-of-sequence token)."""
    rng = random.Random(seed)

    def text(n: int) -> str:
        return "".join(rng.choices(_LETTERS, k=n))

    return [
        {"prompt": text(shape.prompt), "chosen": text(shape.completion - 1), "rejected": text(shape.completion - 1)}
        for _ in range(rows)
    ]


def build_models(model_name: str, device: str, dtype: torch.dtype):
    """The policy (random init, seed 0) and a frozen copy as the reference, on ``device`` in ``dtype``."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(**MODELS[model_name], attn_implementation="sdpa")
    torch.manual_seed(0)
    with torch.device(device):
        policy = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return policy, copy.deepcopy(policy).eval()


# ----------------------------------------------------------------------------------------------
# in-process arms


def _synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _step_timer(device: str):
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        """Wall time of each optimizer step (forward, backward, update), device-synchronised."""

        def __init__(self):
            self.times, self._start = [], 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            _synchronize(device)
            self._start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            _synchronize(device)
            self.times.append(time.perf_counter() - self._start)

    return StepTimer()


def train_in_process(arm: str, plan: Plan, shape: Shape, steps: int) -> dict | None:
    """Train ``steps`` steps of ``arm`` at ``shape`` from fresh models; None when it runs out of memory."""
    from trl import DPOConfig, DPOTrainer

    from dpo_fast.integrations.trl import FastDPOTrainer

    cuda = plan.device.startswith("cuda")
    dtype = torch.bfloat16 if cuda else torch.float32
    trainer = policy = reference = None
    try:
        policy, reference = build_models(plan.model, plan.device, dtype)
        with tempfile.TemporaryDirectory() as output_dir:
            args = DPOConfig(
                output_dir=output_dir, per_device_train_batch_size=shape.pairs, max_steps=steps,
                max_length=shape.length, bf16=cuda, gradient_checkpointing=True, learning_rate=1e-6,
                logging_steps=steps, save_strategy="no", report_to=[], disable_tqdm=True, seed=0,
                use_liger_kernel=arm == "trl-liger", use_cpu=not cuda,
            )  # fmt: skip
            timer = _step_timer(plan.device)
            options = {}
            trainer_class = DPOTrainer
            if arm.startswith("fast"):
                trainer_class = FastDPOTrainer
                options = {"token_metrics": arm != "fast-nometrics", "prefix_sharing": arm == "fast-shared"}
            from datasets import Dataset

            trainer = trainer_class(
                model=policy, ref_model=reference, args=args, processing_class=tokenizer(), callbacks=[timer],
                train_dataset=Dataset.from_list(preference_rows(shape, shape.pairs * steps)), **options,
            )  # fmt: skip
            peak = [0.0]
            if cuda:
                torch.cuda.reset_peak_memory_stats()
                stop = _poll(_gpu_memory_sampler(os.getpid(), peak), 0.2)
            else:
                rss_before = _reset_peak_rss()
            try:
                trainer.train()
            finally:
                if cuda:
                    stop.set()
            times = timer.times[plan.warmup_steps :] or timer.times
            result = {
                "pairs": shape.pairs, "length": shape.length, "steps": len(timer.times),
                "step_s": statistics.median(times), "step_s_all": timer.times,
                "tokens_per_s": shape.tokens / statistics.median(times),
            }  # fmt: skip
            if cuda:
                result["peak_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
                result["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
                result["peak_process_gib"] = peak[0]
            else:
                result["peak_process_gib"] = _status_gib(os.getpid(), "VmHWM")
                result["peak_rss_growth_gib"] = result["peak_process_gib"] - rss_before
            return result
    except torch.OutOfMemoryError:
        return None
    finally:
        del trainer, policy, reference
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------
# the lean trainer's CLI, in its own process. Its config keys follow the trainer's TrainConfig
# (dpo_fast/trainer/config.py); adjust here if they change.


def _cli_available() -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec("dpo_fast.trainer.cli") is not None
    except ModuleNotFoundError:  # no dpo_fast.trainer package at all
        return False


def _poll(sample, interval: float):
    """Run ``sample()`` every ``interval`` seconds in a thread until the returned event is set."""
    stop = threading.Event()

    def loop():
        while not stop.is_set():
            sample()
            stop.wait(interval)

    threading.Thread(target=loop, daemon=True).start()
    return stop


def _gpu_memory_sampler(pid: int, peak: list[float]):
    """A sampler that keeps in ``peak[0]`` the most GPU memory nvidia-smi has shown for process ``pid`` (GiB)."""

    def sample():
        out = subprocess.run(
            ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, check=False,
        ).stdout  # fmt: skip
        for line in out.splitlines():
            fields = [field.strip() for field in line.split(",")]
            if len(fields) == 2 and fields[0] == str(pid) and fields[1].isdigit():
                peak[0] = max(peak[0], int(fields[1]) / 1024)

    return sample


def _status_gib(pid: int, field: str) -> float:
    """A field of ``/proc/<pid>/status`` (Linux), in GiB; 0.0 once the process is gone."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 2**20  # kB
    except FileNotFoundError:
        pass
    return 0.0


def _reset_peak_rss() -> float:
    """Reset this process's peak resident set (``VmHWM``) to its current one; returns that, in GiB (Linux)."""
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")
    return _status_gib(os.getpid(), "VmRSS")


def _rss_sampler(pid: int, peak: list[float]):
    """A sampler that keeps in ``peak[0]`` the peak resident set (``VmHWM``, GiB) process ``pid`` has reached."""

    def sample():
        peak[0] = max(peak[0], _status_gib(pid, "VmHWM"))

    return sample


def _log_line_sampler(path: Path, stamps: list[float]):
    """A sampler that appends the time each new line of ``path`` is first seen: with a line logged
    every step, their differences are the step times, whatever the lines hold."""

    def sample():
        lines = path.read_text().count("\n") if path.exists() else 0
        stamps.extend([time.perf_counter()] * (lines - len(stamps)))

    return sample


def run_cli(plan: Plan, shape: Shape, steps: int, workdir: Path, arm: str = "dpo-fast-cli") -> dict | None:
    """``dpo-fast train`` for ``steps`` steps, logging every step; None when it runs out of memory.

    Returns ``step_ends`` (when each step's line reached ``metrics.jsonl``) and the process's peak
    memory: by nvidia-smi on CUDA, its peak resident set on CPU.
    """
    cuda = plan.device.startswith("cuda")
    workdir.mkdir(parents=True, exist_ok=True)
    tokenizer(workdir / "tokenizer")
    from transformers import LlamaConfig

    LlamaConfig(**MODELS[plan.model]).to_json_file(workdir / "model.json")
    with open(workdir / "train.jsonl", "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in preference_rows(shape, shape.pairs * steps))
    config = {
        "tokenizer": str(workdir / "tokenizer"), "dtype": "bfloat16" if cuda else "float32", "bf16": cuda,
        "gradient_checkpointing": True, "reference": "model", "per_device_train_batch_size": shape.pairs,
        "max_length": shape.length, "max_prompt_length": shape.prompt, "learning_rate": 1e-6,
        "logging_steps": 1, "seed": 0, "prefix_sharing": arm == "dpo-fast-cli-shared",
    }  # fmt: skip
    (workdir / "config.json").write_text(json.dumps(config))
    output_dir = workdir / "output"  # removed after each run: the trainer checkpoints at the end
    command = [
        sys.executable, "-m", "dpo_fast.trainer.cli", "train", "--config", str(workdir / "config.json"),
        "--model", str(workdir / "model.json"), "--dataset", str(workdir / "train.jsonl"),
        "--output-dir", str(output_dir), "--max-steps", str(steps), "--backend", "auto",
    ]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak, step_ends = [0.0], []
    stops = [_poll(_log_line_sampler(output_dir / "metrics.jsonl", step_ends), 0.005)]
    stops.append(_poll((_gpu_memory_sampler if cuda else _rss_sampler)(process.pid, peak), 0.2))
    try:
        output, _ = process.communicate(timeout=max(1.0, plan.deadline - time.time()))
    finally:
        for stop in stops:
            stop.set()
        shutil.rmtree(output_dir, ignore_errors=True)
    if process.returncode != 0:
        if "OutOfMemoryError" in output or "CUDA out of memory" in output:
            return None
        raise RuntimeError(f"dpo-fast train failed ({process.returncode}):\n{output[-3000:]}")
    return {"step_ends": step_ends, "peak_process_gib": peak[0]}


def _cli_timing(plan: Plan, workdir: Path, arm: str) -> dict | None:
    """Step times from the moments successive steps' log lines appeared."""
    steps = plan.warmup_steps + plan.timed_steps
    run = run_cli(plan, plan.timing, steps, workdir, arm)
    if run is None:
        return None
    ends = run["step_ends"]
    if len(ends) != steps:
        raise RuntimeError(f"dpo-fast train logged {len(ends)} lines for {steps} steps (logging_steps=1 expected)")
    times = [later - earlier for earlier, later in itertools.pairwise(ends)][plan.warmup_steps - 1 :]
    step_s = statistics.median(times)
    return {
        "pairs": plan.timing.pairs, "length": plan.timing.length, "steps": steps, "step_s": step_s,
        "step_s_all": times, "tokens_per_s": plan.timing.tokens / step_s, "peak_process_gib": run["peak_process_gib"],
    }  # fmt: skip


# ----------------------------------------------------------------------------------------------
# the search for the largest shape that fits


def _largest_fitting(candidates: tuple[int, ...], fits, deadline: float) -> dict:
    """Doubling over ascending ``candidates``, then one bisection between the last fit and the first miss.

    ``fits(value) -> bool``. Returns ``fits`` (largest value that trained, or None), ``fails`` (the
    smallest that ran out of memory, or None) and ``complete`` (False when the deadline cut it short).
    """
    best, failed, last_probe_s = None, None, 0.0
    for value in candidates:
        if time.time() + 3 * last_probe_s > deadline:
            return {"fits": best, "fails": failed, "complete": False}
        start = time.time()
        if not fits(value):
            failed = value
            break
        best, last_probe_s = value, time.time() - start
    if best is not None and failed is not None and failed > best + 1:
        middle = (best + failed) // 2
        if time.time() + 3 * last_probe_s <= deadline:
            if fits(middle):
                best = middle
            else:
                failed = middle
    return {"fits": best, "fails": failed, "complete": True}


def measure(plan: Plan) -> None:
    """Every measurement of the plan, each arm in turn; results written to ``plan.result_path`` as they come."""
    results = {arm: {"model": plan.model, "arm": arm} for arm in plan.arms}

    def save():
        Path(plan.result_path).write_text(json.dumps(results, indent=1))

    for arm in plan.arms:
        reason = _unavailable(arm, plan.device.startswith("cuda"))
        if reason:
            results[arm].update(status="skipped", reason=reason)
            save()
            continue
        workdir = Path(tempfile.mkdtemp(prefix=f"bench-{arm}-"))
        try:
            _measure_arm(arm, plan, workdir, results[arm], save)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)


def _measure_arm(arm: str, plan: Plan, workdir: Path, entry: dict, save) -> None:
    """Timing, then the searches of the plan, into ``entry``; ``save()`` after each."""
    run = _runner(arm, plan, workdir)
    if arm in CLI_ARMS:
        entry["timing"] = _cli_timing(plan, workdir, arm)
    else:
        entry["timing"] = run(plan.timing, plan.warmup_steps + plan.timed_steps)
    entry["status"] = "ok" if entry["timing"] is not None else "out of memory at the timing shape"
    save()
    if plan.search_lengths:
        entry["longest_sequence"] = _largest_fitting(
            plan.search_lengths, lambda n: run(Shape(1, n), 2) is not None, plan.deadline
        )
        save()
    if plan.search_pairs:
        entry["largest_batch"] = _largest_fitting(
            plan.search_pairs, lambda p: run(Shape(p, plan.timing.length), 2) is not None, plan.deadline
        )
        entry["largest_batch"]["length"] = plan.timing.length
        save()


def _runner(arm: str, plan: Plan, workdir: Path):
    """``run(shape, steps) -> dict | None`` (None: out of memory) for the arm."""
    if arm in CLI_ARMS:
        return lambda shape, steps: run_cli(plan, shape, steps, workdir, arm)
    return lambda shape, steps: train_in_process(arm, plan, shape, steps)


def _unavailable(arm: str, cuda: bool) -> str | None:
    import importlib.util

    if arm == "trl-liger" and not cuda:
        return "Liger's kernels need a CUDA GPU"
    if arm == "trl-liger" and importlib.util.find_spec("liger_kernel") is None:
        return "liger-kernel is not installed"
    if arm in CLI_ARMS and not _cli_available():
        return "the lean trainer (dpo_fast.trainer, `dpo-fast train`) is not installed"
    return None


def plan_from_json(text: str) -> Plan:
    values = json.loads(text)
    values["arms"] = tuple(values["arms"])
    values["timing"] = Shape(**values["timing"])
    values["search_lengths"] = tuple(values["search_lengths"])
    values["search_pairs"] = tuple(values["search_pairs"])
    return Plan(**values)


def plan_to_json(plan: Plan) -> str:
    return json.dumps(asdict(plan))


if __name__ == "__main__":  # python train_arms.py PLAN_JSON: one worker
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    measure(plan_from_json(sys.argv[1]))
