"""Task files: many videos in one run, as MuseV's scripts take `--test_data_path configs/tasks/*.yaml`.

A run configuration may hold `[[task]]` tables. The file's top-level sections are every task's defaults;
each task gives its `name`, and may give `img_length_ratio`, `vars` (prompt template variables) and
`[task.input]` / `[task.generation]` tables that override the defaults key by key. `--set` overrides
apply to every task and win over both. Each task is a run of its own that writes `<name>-<seed>.*`;
the models are loaded once.

    [[task]]
    name = "girl"
    img_length_ratio = 0.957          # MuseV's: (height, width) x ratio, floored to a multiple of 64
    vars = { eye_blinks_factor = 1.8 }
    [task.input]
    image = "girl.png"
    prompt = "(1girl, solo:1), (eye blinks:{eye_blinks_factor})"

`load_tasks` reads and checks every task's settings (None for a file without tasks: one run, as
always). `run_all` checks every task's inputs before the first task starts, skips tasks whose outputs
exist, runs the others (a failed task does not stop the rest) and prints a table of what each did. Under
torchrun the tasks are shared out whole over the ranks (`distributed.assign_tasks`), each rank writing its own.
`fill_template` and `scaled_size` are MuseV's prompt templates and img_length_ratio, read from its
scripts/inference/text2video.py, video2video.py and musev/auto_prompt (the MuseV commit the project tracks).
`import_tasks` (`musev-lite import-tasks example.yaml > tasks.toml`) converts MuseV's task YAML; it needs
PyYAML, an optional extra (`pip install "musev-lite[yaml]"`).
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import os
import random
import re
import sys
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path

from . import distributed
from .checkpoint import checkpoint_seed
from .command import exit_code
from .config import (RunConfig, config_from, load_config, output_kinds, read_tables, relative_paths, resolve_paths,
                     to_toml, toml_value)
from .device import resolve_device, resolve_dtype
from .inputs import load_pipeline, read_inputs
from .limits import file_stem
from .memory import out_of_memory
from .outputs import OutputSet, RunInterrupted, check_output_dir
from .settings import ConfigError, in_range, printable, require, suggest
from .video_io import read_image

TASK_KEYS = ("name", "img_length_ratio", "vars", "input", "generation")
RUNNING_TASK = ContextVar("running_task", default="")  # "task 3/12  " while run_all runs it: progress lines start so
SECTIONS = ("input", "generation")  # what a task may override; the models and outputs are the run's


@dataclass
class Task:
    """One `[[task]]` table as a run: its number (from 1) of `count`, its name, its whole configuration
    (defaults, its own settings, --set; prompt filled, size scaled) and its template variables."""

    number: int
    count: int
    name: str
    config: RunConfig
    variables: dict = field(default_factory=dict)
    note: str = ""  # how img_length_ratio sized the video, for stderr

    @property
    def label(self) -> str:
        return f"task {self.number}/{self.count} ({self.name})"


def fill_template(prompt: str, variables: dict) -> str:
    """A task's prompt with every `{name}` replaced by its variable, as MuseV fills a prompt template: a
    prompt without braces is taken as it is; a value's text is split at commas and joined with ", "; then
    every run of commas and spaces that starts with a comma becomes one ", " (MMCM's merge_near_same_char).
    An unknown variable, or a brace that is not part of `{name}`, is a ConfigError naming it."""
    if "{" not in prompt and "}" not in prompt:
        return prompt

    def value(match: re.Match) -> str:
        key = match[1]
        require(key.isidentifier(), f"input.prompt: {match[0]!r} is not a template variable; write {{name}} "
                "with the name of one of the task's vars")
        if key not in variables:
            raise ConfigError(f"input.prompt: unknown template variable {{{key}}}{suggest(key, variables)}; "
                              f"give it in the task's vars, e.g. vars = {{ {key} = 1.8 }}")
        return ", ".join(str(variables[key]).split(","))

    pattern = re.compile(r"\{([^{}]*)\}")
    stray = pattern.sub("", prompt)
    require("{" not in stray and "}" not in stray, f"input.prompt = {prompt!r} has a {{ or }} that does not "
            "enclose a template variable; write {name} for a variable of the task's vars")
    return re.sub(r"(?:, *)+", ", ", pattern.sub(value, prompt))


def scaled_size(height: int, width: int, ratio: float) -> tuple[int, int]:
    """MuseV's img_length_ratio: each side times the ratio, floored to a multiple of 64 (its scripts
    choose 64, not 8, to match video2video's sizes)."""
    return int(height * ratio // 64 * 64), int(width * ratio // 64 * 64)


def task_size(config: RunConfig, ratio: float) -> tuple[int, int]:
    """The (height, width) img_length_ratio gives: generation.height / width, else the condition image's
    own size (as MuseV: not scaled to 512 first), times the ratio, floored to 64."""
    g, image = config.generation, config.input.image
    height, width = g.height, g.width
    if not (height and width):
        require(image != "", "img_length_ratio scales generation.height and generation.width, or the condition "
                "image's size; set input.image, or both sizes")
        try:
            w, h = read_image(image).size
        except ValueError as err:
            raise ConfigError(f"input.image: {err}{config.path_note('input.image')}") from None
        height, width = height or h, width or w
    size = scaled_size(height, width, ratio)
    require(min(size) >= 64, f"img_length_ratio = {ratio:g} makes the video {size[0]}x{size[1]} from {height}x{width} "
            "(MuseV floors each side times the ratio to a multiple of 64); use a larger ratio or size")
    return size


def build_task(table, number: int, count: int, defaults: dict, notes: dict, overrides: list[str],
               folder: Path) -> Task:
    """One `[[task]]` table merged over the file's `defaults` (its tables, paths resolved) and checked."""
    require(isinstance(table, dict), "must be a table: [[task]] name = \"...\"")
    for key in table:
        require(key in TASK_KEYS, f"unknown key {printable(key)}{suggest(key, TASK_KEYS)} (a task's settings go in "
                "[task.input] and [task.generation], its template variables in vars)")
    name = file_stem("name", table.get("name", ""), ConfigError)
    variables = table.get("vars", {})
    require(isinstance(variables, dict) and all(isinstance(v, (str, int, float, bool)) for v in variables.values()),
            "vars must be a table of strings, numbers or booleans, e.g. vars = { eye_blinks_factor = 1.8 }")
    own = {section: copy.deepcopy(table.get(section, {})) for section in SECTIONS}
    for section, values in own.items():
        require(isinstance(values, dict), f"{section} must be a table: [task.{section}]")
    own_notes = resolve_paths(own, folder)
    data = copy.deepcopy(defaults)
    for section, values in own.items():
        require(isinstance(data.setdefault(section, {}), dict), f"[{section}] must be a table of keys")
        data[section].update(values)
    notes = {k: v for k, v in notes.items()  # a path the task sets is no longer the defaults'
             if k.partition(".")[2].partition("[")[0] not in own.get(k.partition(".")[0], {})}
    ratio = table.get("img_length_ratio")
    if ratio is not None:  # the file's sizes are scaled, so need not be multiples of 8; --set's are checked
        in_range("img_length_ratio", ratio, 0.01, 16)
        base = {key: data["generation"].pop(key, 0) for key in ("height", "width")}
        for key, value in base.items():
            require(isinstance(value, int) and not isinstance(value, bool) and value >= 0,
                    f"generation.{key} = {value!r} must be a size in pixels (0: the image's)")
    config = config_from(data, {**notes, **own_notes}, overrides, stem=name)
    require(config.output.name == "", f"output.name = {config.output.name!r} is set, but each task writes "
            "<task name>-<seed>; remove output.name")
    config.input.prompt = fill_template(config.input.prompt, {"name": name, **variables})
    note = ""
    if ratio is not None:
        g = config.generation
        g.height, g.width = g.height or base["height"], g.width or base["width"]
        height, width = task_size(config, ratio)
        note = f", size {height}x{width} by img_length_ratio {ratio:g}"
        config.generation = g.replace(height=height, width=width)
        config.generation.validate(has_image=config.input.image != "" or config.input.video != "")
    return Task(number, count, name, config, dict(variables), note)


def load_tasks(path: str | Path | None, overrides: list[str]) -> list[Task] | None:
    """Every `[[task]]` of a config file as a checked Task (an error names the task); None when the file
    has no tasks (one run, `config.load_config`)."""
    if path is None:
        return None
    data, notes = read_tables(path)
    if "task" not in data:
        return None
    tables = data.pop("task")
    require(isinstance(tables, list) and len(tables) > 0, f"config file {path}: task must be [[task]] tables")
    tasks, names = [], {}
    for number, table in enumerate(tables, start=1):
        name = table.get("name") if isinstance(table, dict) else None
        try:
            tasks.append(build_task(table, number, len(tables), data, notes, list(overrides), Path(path).parent))
        except ConfigError as err:
            called = f" ({printable(name)})" if isinstance(name, str) and name else ""
            raise ConfigError(f"task {number}/{len(tables)}{called}: {err}") from None
        if tasks[-1].name in names:
            raise ConfigError(f"tasks {names[tasks[-1].name]} and {number} are both named {tasks[-1].name!r}, so they "
                              "would write the same outputs; give each task its own name")
        names[tasks[-1].name] = number
    return tasks


def tasks_toml(tasks: list[Task]) -> str:
    """`--print-config` of a task file: each task's whole resolved input and generation settings as
    `[[task]]` tables (their prompts filled, sizes scaled), after the shared model and output sections."""
    lines = [to_toml(tasks[0].config, ("model", "output"))]
    for task in tasks:
        lines.append(f"[[task]]\nname = {toml_value(task.name)}")
        data = task.config.as_dict()
        for holder, key, _ in list(relative_paths(data)):
            holder[key] = os.path.abspath(holder[key])
        for section in SECTIONS:
            lines.append(f"[task.{section}]")
            lines += [f"# {k} = (unset)" if v is None else f"{k} = {toml_value(v)}" for k, v in data[section].items()]
        if task.variables:
            lines.append("[task.vars]")
            lines += [f"{toml_key(k)} = {toml_value(v)}" for k, v in task.variables.items()]
        lines.append("")
    return "\n".join(lines)


def resolved_toml(path: str | Path | None, overrides: list[str]) -> str:
    """`--print-config`: the resolved configuration as TOML, of one run or of every task (`tasks_toml`)."""
    tasks = load_tasks(path, overrides)
    return tasks_toml(tasks) if tasks else to_toml(load_config(path, overrides))


# ---------------------------------------------------------------------------------------------
# Running the tasks


@dataclass
class Outcome:
    """What became of one task: done, failed, skipped or not run, with the paths it wrote or why."""

    task: Task
    status: str = "not run"
    detail: str = ""


def sidecar_seeds(out: Path, name: str, suffix: str) -> list[int]:
    """The seeds of `<name>-<seed><suffix>` entries of `out` (finished outputs' sidecars, checkpoints)."""
    pattern = re.compile(rf"{re.escape(name)}-(\d+){re.escape(suffix)}")
    return sorted(int(m[1]) for p in (out.iterdir() if out.is_dir() else []) if (m := pattern.fullmatch(p.name)))


def plan_task(task: Task, out: Path, resume: bool) -> tuple[int | None, str, str]:
    """(seed, what to do, why): "run", "resume" (--resume and its checkpoint exists) or "skip" (its outputs
    exist and output.overwrite is false). A drawn seed is found again from a checkpoint (--resume)
    or finished outputs `<name>-<seed>.json`. Raises a ConfigError for what would stop the task later: an
    interrupted run's checkpoint without --resume, or outputs of its name that are not a whole set."""
    o, seed = task.config.output, task.config.generation.seed
    if seed is None:
        if resume and sidecar_seeds(out, task.name, ".checkpoint"):
            seed = checkpoint_seed(out, task.name)
        elif (done := sidecar_seeds(out, task.name, ".json")) and not o.overwrite:
            return None, "skip", f"{task.name}-{done[-1]}.json exists (output.overwrite = true runs it again)"
        else:
            seed = random.randrange(10**8)
    stem = f"{task.name}-{seed}"
    outputs = OutputSet(out, stem, output_kinds(o, stem))
    existing = outputs.existing()
    if existing and not o.overwrite:
        require(os.path.lexists(out / outputs.names[-1]), f"{existing[0]} exists but not {outputs.names[-1]}, so the "
                "task did not write it; move it away, or set output.overwrite = true to replace it")
        return seed, "skip", f"{outputs.names[-1]} exists (output.overwrite = true runs it again)"
    if (out / f"{stem}.checkpoint").exists():
        if resume:
            return seed, "resume", ""
        require(o.overwrite, f"{out / f'{stem}.checkpoint'} holds an interrupted run of this task: continue it with "
                "--resume, or set output.overwrite = true to start over (it is deleted)")
    return seed, "run", ""


def named(task: Task, work: Callable):
    """`work()`, a ConfigError (or other ValueError) naming `task`."""
    try:
        return work()
    except ValueError as err:
        raise ConfigError(f"{task.label}: {err}") from None


def print_table(outcomes: list[Outcome], title: str = "tasks") -> None:
    """The end of a task run on stderr: one line per task, what became of it."""
    counts = {s: sum(o.status == s for o in outcomes) for s in ("done", "failed", "skipped", "not run")}
    print(f"{title}: " + ", ".join(f"{n} {s}" for s, n in counts.items() if n), file=sys.stderr)
    width = max((len(o.task.name) for o in outcomes), default=0)
    for o in outcomes:
        print(f"  {o.task.number:>{len(str(o.task.count))}}/{o.task.count}  {o.task.name:<{width}}  {o.status:<7}  "
              f"{o.detail}", file=sys.stderr, flush=True)


class TasksFailed(ValueError):
    """Some tasks failed (the others ran): the command's exit code is 2."""


def run_all(tasks: list[Task], resume: bool, make_job: Callable, check: Callable, write: Callable,
            follow: Callable | None = None) -> list:
    """Run the tasks: every task's inputs read and its outputs planned before the models load, then every
    task that runs checked against them (size, ControlNets, memory) before the first one starts; an error
    there names the task and nothing is written. Then each task writes its own output set, its paths printed
    as it finishes; a failed task (a bad file, a full disk, out of memory) does not stop the others. The
    end prints a table of every task; any failure raises TasksFailed.
    The models are loaded once, from the tasks' shared [model]. `make_job(task, seed, resume, device, dtype)`
    makes a task's run (`run.Job`), `check(pipe, job) -> (pipe, controls, plan)` checks it, `write(pipe, job)
    -> paths` does it, and `follow(pipe, job)` does a rank's share of it where another rank writes.
    Under torchrun the ranks join first; rank 0's plan (seeds drawn, skips) holds for all, the tasks are
    shared out by `distributed.assign_tasks` (each rank writes its own tasks' outputs) and rank 0 prints
    the end table of every rank's results."""
    model = tasks[0].config.model
    device = distributed.rank_device(resolve_device(model.device, "model.device"))
    dtype = resolve_dtype(model.dtype, device)
    out = check_output_dir(tasks[0].config.output.dir, tasks[0].config.path_note("output.dir"))
    plans = {}
    for task in tasks:
        named(task, lambda: read_inputs(task.config))  # read again when the task starts; not kept meanwhile
        plans[task.number] = named(task, lambda: plan_task(task, out, resume))
    try:
        ranks = distributed.init(device)
        if ranks is not None:  # one plan for all: the seeds rank 0 drew, what it found in output.dir
            plans = ranks.broadcast(plans, "sharing the task plan")
        return run_planned(tasks, plans, ranks, resume, device, dtype, make_job, check, write, follow)
    finally:
        distributed.shutdown()


def run_planned(tasks, plans, ranks, resume, device, dtype, make_job, check, write, follow) -> list:
    """`run_all` once the ranks agree on the plans: check every task, share them out, run this rank's, gather
    the results on rank 0 for the table."""
    outcomes = [Outcome(t, "skipped", plans[t.number][2]) if plans[t.number][1] == "skip" else Outcome(t)
                for t in tasks]
    todo = [o for o in outcomes if o.status == "not run"]
    pipe = load_pipeline(tasks[0].config, device, dtype) if todo else None
    jobs = {o.task.number: lambda o=o: make_job(o.task, plans[o.task.number][0], plans[o.task.number][1] == "resume",
                                                device, dtype) for o in todo}

    def check_all() -> list[int]:  # each task's estimated work: frames x steps
        checked = [named(o.task, lambda: check(pipe, jobs[o.task.number]())[2]) for o in todo]
        return [plan.total_frames * plan.config.steps for plan in checked]

    work = distributed.agreed(ranks, check_all, "checking the tasks")[0]  # rank 0's estimates
    rank, world = (0, 1) if ranks is None else (ranks.rank, ranks.world)
    members = distributed.assign_tasks(work, world)
    shared = {o.task.number: ranks.subgroup(m) if len(m) > 1 else None for o, m in zip(todo, members)}
    mine = [(o, m) for o, m in zip(todo, members) if rank in m]
    gathered = False
    try:
        for o, m in mine:
            if m[0] == rank:
                where = "" if ranks is None else f" on {distributed.ranks_label(m)}"
                seed, how, _ = plans[o.task.number]
                print(f"{o.task.label}: {'resuming' if how == 'resume' else 'starting'}{where}, seed {seed}{o.task.note}",
                      file=sys.stderr)
            with distributed.sharing(shared[o.task.number]):
                run_task(o, jobs[o.task.number], m[0] == rank, pipe, write, follow)
        if ranks is not None:  # each task's result from the rank that wrote it
            for part in ranks.all_gather({o.task.number: (o.status, o.detail) for o, m in mine if m[0] == rank},
                                         "gathering the task results"):
                for o in todo:
                    o.status, o.detail = part.get(o.task.number, (o.status, o.detail))
        gathered = True
    except RunInterrupted as stop:  # under torchrun each rank has its own outputs: one that does not report says its own
        if not distributed.reports():
            print(f"rank {rank}: {stop.report()}", file=sys.stderr)
        raise
    finally:
        if ranks is None or (gathered and rank == 0):
            print_table(outcomes)
        elif not gathered:  # stopped: this rank's own tasks
            print_table([o for o, m in mine if m[0] == rank], f"tasks of rank {rank}")
    failed = [o for o in outcomes if o.status == "failed"]
    if failed:
        raise TasksFailed(f"{len(failed)} of {len(tasks)} tasks failed: "
                          + "; ".join(f"{o.task.label}: {o.detail}" for o in failed))
    return []


def run_task(o: Outcome, job: Callable, lead: bool, pipe, write: Callable, follow: Callable) -> None:
    """One task on this rank: written if this rank leads it (`write(pipe, job())`, its paths printed), else
    this rank's share of its work (`follow`). A failure (a bad file, a full disk, out of memory) is the task's
    outcome, not the end of the run."""
    running = RUNNING_TASK.set(f"task {o.task.number}/{o.task.count}  ")
    try:
        if not lead:
            follow(pipe, job())
            return
        paths = write(pipe, job())
    except (ValueError, MemoryError, RuntimeError) as err:
        if isinstance(err, RuntimeError) and not out_of_memory(err):
            raise
        o.status, o.detail = "failed", (str(err).splitlines() or [type(err).__name__])[0][:300]
        print(f"{o.task.label} failed: {o.detail}", file=sys.stderr, flush=True)
        return
    finally:
        RUNNING_TASK.reset(running)
    o.status, o.detail = "done", ", ".join(str(p) for p in paths)
    for path in paths:
        print(path, flush=True)


# ---------------------------------------------------------------------------------------------
# MuseV's YAML task files

# MuseV's task keys -> ours (section, key); the others are kept as template variables (vars).
YAML_KEYS = {"condition_images": ("input", "image"), "prompt": ("input", "prompt"),
             "refer_image": ("input", "refer_image"), "ipadapter_image": ("input", "ip_adapter_image"),
             "video_negative_prompt": ("input", "negative_prompt"), "height": ("generation", "height"),
             "width": ("generation", "width"), "motion_speed": ("generation", "motion_speed"),
             "w_ind_noise": ("generation", "w_ind_noise"), "img_weight": ("generation", "img_weight"),
             "redraw_condition_image": ("generation", "redraw_condition_image")}
PATHS = ("condition_images", "refer_image", "ipadapter_image", "video_path")
INTERPOLATION = re.compile(r"\$\{([^${}]*)\}")


def read_yaml(path: Path) -> list:
    """MuseV's task YAML as a list of mappings (PyYAML, an optional extra)."""
    try:
        import yaml
    except ImportError:
        raise ConfigError("reading MuseV's YAML task files needs PyYAML, which is not installed: "
                          "pip install pyyaml (or pip install \"musev-lite[yaml]\")") from None
    try:
        data = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"task file {path} not found") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise ConfigError(f"task file {path} is not readable YAML: {' '.join(str(err).split())}") from None
    require(isinstance(data, list) and all(isinstance(t, dict) for t in data),
            f"task file {path} must be a YAML list of tasks (- name: ...), as MuseV's configs/tasks/*.yaml")
    return data


def interpolate(task: dict, where: str) -> dict:
    """OmegaConf's relative interpolations `${.key}` resolved within the task: a value that is only the
    interpolation takes the key's value (and type), one inside text its text. Chains are followed."""

    def resolve(value, seen: tuple):
        if not isinstance(value, str) or "${" not in value:
            return value
        keys = INTERPOLATION.findall(value)
        for key in keys:
            require(key.startswith(".") and key[1:] in task, f"{where}: {value!r}: only ${{.key}} of a key of the same "
                    f"task is supported{'' if not key.startswith('.') else f'; the task has no {key[1:]!r}'}")
            require(key not in seen, f"{where}: {value!r} refers to itself through {' -> '.join(seen + (key,))}")
        if INTERPOLATION.fullmatch(value):
            return resolve(task[keys[0][1:]], seen + (keys[0],))
        return INTERPOLATION.sub(lambda m: str(resolve(task[m[1][1:]], seen + (m[1],))), value)

    return {key: resolve(value, (f".{key}",)) for key, value in task.items()}


def fiss(task: dict) -> list[dict]:
    """MuseV's task fission (MMCM fiss_tasks): a text value with '|' makes one task per alternative, every
    combination of them. Their names get _1, _2, ... so that each writes its own outputs."""
    split = {k: v.split("|") for k, v in task.items() if isinstance(v, str) and "|" in v}
    if not split:
        return [task]
    tasks = []
    for n, values in enumerate(itertools.product(*split.values()), start=1):
        tasks.append({**task, **dict(zip(split, values)), "name": f"{task.get('name')}_{n}"})
    return tasks


def convert_task(task: dict, number: int, root: Path | None) -> dict:
    """One MuseV task as our `[[task]]` table: name, img_length_ratio (MuseV's default 1.0 when absent),
    input and generation settings, the other keys as vars."""
    table = {"name": str(task["name"]), "img_length_ratio": float(task.get("img_length_ratio", 1.0))}
    sections = {"input": {}, "generation": {}}
    variables = {}
    for key, value in task.items():
        if value is None or key in ("name", "img_length_ratio", "video_is_middle"):
            continue
        if key in PATHS:
            require(isinstance(value, str), f"task {number}: {key} = {value!r}: musev_lite takes one file per task")
            value = str((root / value).resolve()) if root is not None and not Path(value).is_absolute() else value
        if key == "video_path":
            if task.get("video_is_middle"):  # a control (pose) video, not an RGB one
                sections["input"]["control"] = [{"path": value}]
            else:
                sections["input"]["video"] = value
        elif key == "negative_prompt" and "video_negative_prompt" not in task:
            sections["input"]["negative_prompt"] = value
        elif key in YAML_KEYS:
            section, name = YAML_KEYS[key]
            sections[section][name] = value
        elif isinstance(value, (str, int, float, bool)):
            variables[key] = value
        else:
            variables[key] = json.dumps(value, default=str)
    table.update({k: v for k, v in sections.items() if v})
    if variables:
        table["vars"] = variables
    return table


def toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else json.dumps(key, ensure_ascii=False)


def import_tasks(path: str | Path, root: str | Path | None = None) -> str:
    """MuseV's task YAML (`${.key}` interpolations resolved, fission by '|' done) as `[[task]]` tables of
    a run configuration, with a header that says what to add."""
    raw = read_yaml(Path(path))
    tasks = [t for n, task in enumerate(raw, start=1)  # MuseV names a task without a name by its index
             for t in fiss({"name": n - 1, **interpolate(task, f"task {n}")})]
    paths = (f"relative to {Path(root).resolve()}, written absolute." if root is not None else
             "as the YAML wrote them, so relative to this file's folder (or convert with --root DIR).")
    lines = [f"# {len(tasks)} tasks converted by musev-lite import-tasks from MuseV's {Path(path).name}.",
             f"# Paths: {paths}",
             "# Add [model], [generation] and [output] sections above the tasks: they are every task's defaults.",
             "# A video_path with video_is_middle became input.control (a pose video), another input.video",
             "# (RGB video2video; MuseV would extract the controls from it).", ""]
    for number, task in enumerate(tasks, start=1):
        table = convert_task(task, number, None if root is None else Path(root))
        lines.append("[[task]]")
        lines += [f"{toml_key(k)} = {toml_value(v)}" for k, v in table.items() if not isinstance(v, dict)]
        for section in ("input", "generation", "vars"):
            if section in table:
                lines.append(f"[task.{section}]")
                lines += [f"{toml_key(k)} = {toml_value(v)}" for k, v in table[section].items()]
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None, prog: str = "python -m musev_lite.tasks") -> int:
    """`musev-lite import-tasks example.yaml > tasks.toml`: MuseV's task YAML as [[task]] tables on stdout."""
    parser = argparse.ArgumentParser(prog=prog, description="Convert MuseV's task YAML (configs/tasks/*.yaml) into "
                                     "[[task]] tables of a run configuration, printed on stdout.")
    parser.add_argument("yaml", help="a MuseV task file, e.g. configs/tasks/example.yaml")
    parser.add_argument("--root", metavar="DIR", help="the folder the YAML's relative paths are relative to (MuseV's "
                        "scripts ran in its repository root); they are written absolute")
    args = parser.parse_args(argv)
    return exit_code(lambda: [import_tasks(args.yaml, args.root).rstrip("\n")])


if __name__ == "__main__":
    sys.exit(main())
