"""`nanoseek distill`: rejection sampling and distillation (R1 paper §2.3.3, §2.4).

    1. the teacher samples k completions for each of `prompts` training-split problems (the inference
       engine, continuous batching; T and top-p as configured), weight-only int8 / int4 with
       distill.teacher_quantize (nanoseek.quant)
    2. only verified-correct completions are kept (the task's checker or math-verify: rewards.answer_correct),
       distinct texts, at most `per_prompt` per problem
    3. they become chat SFT data ({"messages": [user, assistant]} JSONL, then shards with the student's
       tokenizer: that of its init=FOLDER when it starts from one, else the teacher's), and a student (any
       preset or model folder, dense or MoE, smaller than the teacher) is trained on them with the loss on
       assistant turns only: `nanoseek train` with data.loss_on=assistant

OUT/distill.jsonl and OUT/summary.json (acceptance rate, examples, tokens) stay for inspection; the
student run is OUT/student (report, plots, checkpoints, held-out accuracy like any run).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from nanoseek.data.shards import prepare
from nanoseek.data.tasks import Problem, get_task
from nanoseek.data.tokenizer import Tokenizer
from nanoseek.hf import load_pretrained, locate
from nanoseek.infer.sampling import SamplingParams
from nanoseek.quant import Spec, parse
from nanoseek.rl.evaluate import generate_completions, prompt_ids, sample_seed
from nanoseek.rl.rewards import accuracy_reward
from nanoseek.train.config import TrainConfig, load_train_config
from nanoseek.train.loop import run as train_run


@dataclass
class DistillConfig:
    teacher: str = "runs/grpo"
    out_dir: str = "runs/distill"
    tasks: str = "add,sub"
    difficulty: int | None = None
    prompts: int = 2000  # per task
    k: int = 4  # teacher samples per prompt
    per_prompt: int = 1  # verified completions kept per prompt, at most
    temperature: float = 0.8
    top_p: float = 0.95
    max_tokens: int = 64
    seed: int = 0
    teacher_quantize: str = "none"  # int8 / int4: the teacher loaded with weight-only quantization, on the CPU
    teacher_group_size: int = 128  # teacher_quantize=int4: input channels per scale

    def __post_init__(self):
        for name in ("prompts", "k", "per_prompt", "max_tokens", "teacher_group_size"):
            if not (isinstance(getattr(self, name), int) and getattr(self, name) >= 1):
                raise ValueError(f"{name}={getattr(self, name)!r} must be a positive integer")
        if self.teacher_quantize not in ("none", "int8", "int4"):
            raise ValueError(f"teacher_quantize={self.teacher_quantize!r} must be one of none, int8, int4")
        try:
            self.teacher_spec()
        except ValueError as e:
            raise ValueError(f"teacher_group_size={self.teacher_group_size}: {e}") from None
        SamplingParams(temperature=self.temperature, top_p=self.top_p)  # same rules as sampling

    def teacher_spec(self) -> Spec | None:
        """The teacher's quantization (nanoseek.quant), None for teacher_quantize=none."""
        return None if self.teacher_quantize == "none" else parse(self.teacher_quantize, self.teacher_group_size)


# student TrainConfig keys that distill sets itself: an override of them would be silently ignored
SET_BY_DISTILL = {"out_dir": "the student is written to distill.out_dir/student; did you mean distill.out_dir={}?",
                  "data.path": "the student trains on the teacher's verified samples (distill.out_dir/shards)",
                  "data.loss_on": "the student's loss is on assistant turns only"}


def split_overrides(overrides: list[str]) -> tuple[list[str], list[str]]:
    """`distill.FIELD=value` (DistillConfig, prefix removed) and the rest (the student's TrainConfig)."""
    ours = [o[len("distill."):] for o in overrides if o.startswith("distill.")]
    return ours, [o for o in overrides if not o.startswith("distill.")]


def check_student_overrides(overrides: list[str]) -> None:
    """Refuse a student override that distill would ignore, naming the key meant."""
    distill_only = ({f.name for f in dataclasses.fields(DistillConfig)}
                    - {f.name for f in dataclasses.fields(TrainConfig)})
    for item in overrides:
        key, _, value = item.partition("=")
        if key.strip() in SET_BY_DISTILL:
            raise ValueError(f"{item!r} would be ignored: {SET_BY_DISTILL[key.strip()].format(value)}")
        if key.strip() in distill_only:
            raise ValueError(f"{item!r}: {key.strip()} is a distill setting; did you mean 'distill.{key.strip()}'?")


def select_verified(problems: list[Problem], completions: list[list[str]], per_prompt: int
                    ) -> list[tuple[Problem, str]]:
    """(problem, completion) pairs whose final answer verifies, distinct per problem, at most per_prompt."""
    kept = []
    for p, texts in zip(problems, completions):
        seen: set[str] = set()
        for text in texts:
            if len(seen) == per_prompt:
                break
            if text not in seen and accuracy_reward(p, text):
                seen.add(text)
                kept.append((p, text))
    return kept


def sample_teacher(model, tokenizer, problems: list[Problem], cfg: DistillConfig, progress: bool) -> list[list[str]]:
    """k completions per problem, each with its own seed, after the think block its prompt opened (`prompt_ids`)."""
    prompts, openers, params = [], [], []
    for p in problems:
        ids, opener = prompt_ids(p, tokenizer)
        openers.append(opener)
        for i in range(cfg.k):
            prompts.append(ids)
            params.append(SamplingParams(max_tokens=cfg.max_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                                         seed=sample_seed(cfg.seed, p.prompt, i)))
    outs = generate_completions(model, tokenizer, prompts, params, batch_size=256, progress=progress)
    return [[openers[j] + text for text, _, _ in outs[j * cfg.k:(j + 1) * cfg.k]] for j in range(len(problems))]


def student_tokenizer(init: str) -> Tokenizer | None:
    """The tokenizer of a student that starts from init=FOLDER (a run or a model folder): the verified texts are
    its training data, so they are tokenized (and their chats rendered) its way, whatever the teacher's."""
    if not init:
        return None
    run, _, _ = locate(init)
    return Tokenizer.load(run) if (run / "tokenizer.json").is_file() else None


def distill(cfg: DistillConfig, student_config: str | None, student_overrides: list[str], quiet: bool = False
            ) -> dict:
    check_student_overrides(student_overrides)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    spec = cfg.teacher_spec()  # on the CPU either way (load_pretrained's default); quantized: bf16 activations
    teacher = load_pretrained(cfg.teacher, needs_tokenizer="the teacher", quantize=spec)
    names = [t.strip() for t in cfg.tasks.split(",") if t.strip()]
    problems = [p for name in names for p in get_task(name).sample(cfg.prompts, "train", seed=cfg.seed,
                                                                   difficulty=cfg.difficulty)]
    completions = sample_teacher(teacher.model, teacher.tokenizer, problems, cfg, not quiet)
    verified = int(sum(accuracy_reward(p, t) for p, texts in zip(problems, completions) for t in texts))
    kept = select_verified(problems, completions, cfg.per_prompt)
    if not kept:
        raise ValueError(f"the teacher {cfg.teacher} got none of {len(problems)} x {cfg.k} samples right: "
                         f"nothing to distill (more samples, another temperature, or easier tasks)")
    data = out / "distill.jsonl"
    with open(data, "w", encoding="utf-8") as f:
        for p, text in kept:  # the user turn as the teacher's chat template saw it (raw templates: the prompt)
            posed = p.posed()
            user = posed if isinstance(posed, list) else [{"role": "user", "content": p.prompt}]
            f.write(json.dumps({"messages": [*user, {"role": "assistant", "content": text}]},
                               ensure_ascii=False) + "\n")
    shards = out / "shards"
    student = load_train_config(student_config, [*student_overrides, f"data.path={shards}",
                                                 "data.loss_on=assistant", f"out_dir={out / 'student'}"])
    tokenizer = student_tokenizer(student.init) or teacher.tokenizer
    stats = prepare([data], tokenizer, shards, val_fraction=0.05, seed=cfg.seed, progress=not quiet)
    samples = len(problems) * cfg.k
    summary = {"teacher": cfg.teacher, "teacher_quantize": spec.name if spec else "none", "problems": len(problems),
               "samples": samples, "verified": verified, "acceptance": verified / samples, "kept": len(kept),
               "problems_covered": len({p.prompt for p, _ in kept}) / len(problems),
               "tokens": stats["train"]["tokens"] + stats["val"]["tokens"], "config": dataclasses.asdict(cfg)}
    if not quiet:
        print(f"distill: {verified} of {samples} teacher samples verified ({verified / samples:.1%}); kept "
              f"{len(kept)} examples covering {summary['problems_covered']:.1%} of {len(problems)} problems")
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    result = train_run(student, quiet=quiet)
    return {"summary": summary, "student": result}
