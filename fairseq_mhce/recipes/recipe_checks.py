"""The Python steps of the shell recipes ``scripts/recipes/train.sh`` and
``scripts/recipes/translate.sh``:

``savedir-guard ME SAVEDIR DATABIN V [FAIRSEQ_TRAIN_ARGS...]``
    (``scripts/recipes/recipe_common.sh``'s ``savedir_guard``) exit status 2, and the
    reasons on stderr, when SAVEDIR's checkpoints (``checkpoint*.pt``) are
    another run's: another method, other head sizes or adaptive cutoffs,
    another ``--arch`` or another data-bin than the fairseq-train arguments
    given (read last-wins, as argparse does); 0 otherwise.
``score [--word-joiner] GEN GLOG REF HYP JSON METHOD CKPT``
    (``scripts/recipes/translate.sh``) fairseq-generate's ``D-`` lines of GEN in the
    test set's line order into HYP, scored against REF with sacreBLEU (BLEU,
    chrF, signatures; the decoding speed from the log GLOG) into JSON.
    ``--word-joiner``: the hypotheses are undone from the word split of
    :mod:`.word_split` first.

The recipes run it as ``python -m fairseq_mhce.recipes.recipe_checks STEP
...``.  That imports the package, hence fairseq (about a third of torch's
import time on top of torch, which the save-directory check needs anyway to
read the checkpoints): the check runs only when SAVEDIR already holds
checkpoints (``recipe_common.sh`` starts no Python otherwise), and the score
runs once after fairseq-generate, which imports all of it itself.  Tests
import it as a module.
"""

import glob
import json
import os
import re
import sys

import sacrebleu

from .. import safe_load
from ..cfg_access import cfg_get
from ..config import MHCEConfig
from ..modules.output_layer import output_layer_class
from .word_split import detokenize

NEW_DIR = "a new SAVEDIR (a directory without checkpoint*.pt)"


# ---------------------------------------------------------------------------
# savedir-guard


def last(argv, flag, default=None):
    """The value fairseq-train will see for FLAG (argparse: the last one wins)."""
    val = default
    for i, a in enumerate(argv):
        if a == flag and i + 1 < len(argv):
            val = argv[i + 1]
        elif a.startswith(flag + "="):
            val = a[len(flag) + 1 :]
    return val


def option_default(name):
    """The plugin's default of the model option ``name`` (``mhce_method``,
    ``mhce_heads``, ...), from :class:`fairseq_mhce.config.MHCEConfig`."""
    return getattr(MHCEConfig, name)


def method_of(arch, mhce_method, cutoff):
    if str(arch).endswith("_mhce"):
        return str(mhce_method or option_default("mhce_method"))
    return "adaptive" if cutoff not in (None, "", "None") else "softmax"


def sizes_str(s):
    return ",".join(map(str, s)) if s else "automatic"


def cutoff_list(cutoff):
    """fairseq saves --adaptive-softmax-cutoff as the string given or as the
    int list the model parsed it into: compare them as int lists."""
    if cutoff in (None, "", "None"):
        return None
    if isinstance(cutoff, (list, tuple)):
        return [int(c) for c in cutoff]
    return [int(c) for c in str(cutoff).strip("[]()").replace(" ", "").split(",") if c]


def parse_sizes(spec):
    if spec is None or str(spec).strip() in ("", "None", "auto"):
        return None
    return [int(x) for x in str(spec).replace(" ", "").split(",") if x]


def auto_sizes(method, heads, vocab):
    """The head sizes the plugin picks for ``--mhce-heads heads`` at V = vocab."""
    return list(output_layer_class(method).default_head_sizes(vocab, int(heads)))


def load(path):
    """The checkpoint at ``path``, read with the safe loader, its tensors
    memory-mapped (only its config is read here; no code it carries is run;
    one holding a type fairseq does not write raises
    ``UntrustedCheckpointError``, naming it and FAIRSEQ_MHCE_TRUST_CHECKPOINTS)."""
    return safe_load.load_checkpoint_mapped(path)


def same_path(a, b):
    if a is None:
        return True  # nothing recorded: nothing to compare
    return os.path.realpath(str(a)) == os.path.realpath(str(b)) or str(a) == str(b)


def run_settings(argv):
    """What the fairseq-train arguments ask for: arch, method, cutoff, heads, sizes."""
    run = {
        "arch": last(argv, "--arch"),
        "method": method_of(last(argv, "--arch"), last(argv, "--mhce-method"), last(argv, "--adaptive-softmax-cutoff")),
        "cutoff": last(argv, "--adaptive-softmax-cutoff"),
    }
    try:
        heads = last(argv, "--mhce-heads")
        if heads is None and run["method"] in ("mhp", "mhe", "mhs"):
            heads = option_default("mhce_heads")
        run["heads"] = None if heads is None else int(heads)
        run["sizes"] = parse_sizes(last(argv, "--mhce-head-sizes"))
    except ValueError:  # a malformed value: fairseq-train explains it; no head sizes to compare
        run["heads"] = run["sizes"] = "?"
    return run


def foreign_checkpoints(me, savedir, databin, vocab, argv):
    """{(what, continue, otherwise): [checkpoint names]} of the checkpoints in
    savedir that are not this run's (empty: all are, or there are none)."""
    run = run_settings(argv)
    problems = {}  # (what, continue, otherwise) -> [checkpoint names]

    def refuse(name, what, cont, other):
        problems.setdefault((what, cont, other), []).append(name)

    unreadable, readable = [], []  # (name, reason); (mtime, path) of this run's checkpoints
    for path in sorted(glob.glob(os.path.join(glob.escape(savedir), "checkpoint*.pt"))):
        name = os.path.basename(path)
        try:
            state = load(path)
            cfg = state.get("cfg") or {}
            model = cfg_get(cfg, "model") or state.get("args")
            if model is None:
                raise ValueError("no saved config (cfg / args)")
        except Exception as e:  # truncated, not a checkpoint, a type fairseq does not write, ...
            if getattr(e, "types", None):  # UntrustedCheckpointError: its whole message, naming the opt-in
                unreadable.append((name, str(e)))
            else:
                unreadable.append((name, f"{type(e).__name__}: {str(e)[:200]}"))
            continue
        arch = cfg_get(model, "arch") or cfg_get(model, "_name")  # argparse config / hydra config
        cutoff = cfg_get(model, "adaptive_softmax_cutoff")
        ck_method = method_of(arch, cfg_get(model, "mhce_method"), cutoff)
        ck_data = cfg_get(cfg_get(cfg, "task"), "data") or cfg_get(model, "data")
        if ck_method != run["method"]:
            refuse(
                name,
                f"trained with METHOD {ck_method} (--arch {arch}); this run is METHOD {run['method']}",
                f"continue that run with METHOD {ck_method} (scripts/recipes/{me} {ck_method} {ck_data or 'DATABIN'} "
                f"{savedir} ...)",
                f"train {run['method']} in {NEW_DIR}",
            )
            continue
        if run["arch"] is not None and arch is not None and arch != run["arch"]:
            refuse(
                name,
                f"trained with --arch {arch}; this run has --arch {run['arch']}",
                f"continue that run with --arch {arch}",
                f"train --arch {run['arch']} in {NEW_DIR}",
            )
            continue
        if ck_method in ("mhp", "mhe", "mhs") and run["heads"] != "?":
            ck_spec = parse_sizes(cfg_get(model, "mhce_head_sizes"))
            ck_heads = int(cfg_get(model, "mhce_heads") or option_default("mhce_heads"))
            ck_sizes = next(
                (t.tolist() for k, t in state["model"].items() if k.endswith("mhce_head.codec.head_sizes")), ck_spec
            )
            if ck_spec is None and run["sizes"] is None:  # both automatic on one V: the same iff the same H
                same = ck_method == "mhs" or ck_heads == run["heads"]
            else:
                try:
                    same = (ck_sizes or auto_sizes(ck_method, ck_heads, vocab)) == (
                        run["sizes"] or auto_sizes(run["method"], run["heads"], vocab)
                    )
                except ValueError:  # sizes the plugin refuses: fairseq-train says why
                    same = True
            if not same:
                ck_desc = sizes_str(ck_sizes) if ck_sizes else "automatic"
                ck_how = f"--mhce-head-sizes {sizes_str(ck_spec)}" if ck_spec else f"--mhce-heads {ck_heads}"
                run_desc = (
                    f"--mhce-head-sizes {sizes_str(run['sizes'])}"
                    if run["sizes"]
                    else f"automatic sizes for --mhce-heads {run['heads']}"
                )
                refuse(
                    name,
                    f"trained with head sizes {ck_desc} ({ck_how}); this run has {run_desc}",
                    f"continue that run with {ck_how}",
                    f"train these sizes in {NEW_DIR}",
                )
                continue
        if ck_method == "adaptive" and cutoff_list(cutoff) != cutoff_list(run["cutoff"]):
            ck_cut = ",".join(map(str, cutoff_list(cutoff)))
            refuse(
                name,
                f"trained with --adaptive-softmax-cutoff {ck_cut}; this run has {run['cutoff']}",
                f"continue that run with ADAPTIVE_CUTOFF={ck_cut}",
                f"train this cutoff in {NEW_DIR}",
            )
            continue
        if not same_path(ck_data, databin):
            refuse(
                name,
                f"trained on the data-bin {ck_data}; this run's is {databin}",
                f"continue that run with DATABIN {ck_data}",
                f"train on {databin} in {NEW_DIR}",
            )
            continue
        if not any(name in names for names in problems.values()):
            readable.append((os.path.getmtime(path), path))
    restore = next((argv[i + 1] for i in range(len(argv) - 1) if argv[i] == "--restore-file"), None)
    if restore and os.path.isfile(restore) and not any(os.path.basename(restore) == n for n, _ in unreadable):
        unreadable = []  # fairseq resumes from the intact file named; the broken one is left alone
    intact = max(readable)[1] if readable else None
    for name, why in unreadable:
        if intact:
            # a kill during fairseq's copy leaves checkpoint_last.pt empty: this
            # run's other checkpoints are intact, resume from the newest
            refuse(
                name,
                f"cannot be read ({why}); {os.path.basename(intact)} beside it is this run's and intact",
                f"resume from it: pass --restore-file {intact} (do not move or delete anything: a new run "
                f"would overwrite {os.path.basename(intact)})",
                f"train in {NEW_DIR}",
            )
        else:
            refuse(
                name,
                f"cannot be read ({why}), so whose run it is is unknown",
                f"move it out of {savedir}",
                f"train in {NEW_DIR}",
            )
    return problems


def savedir_guard(me, savedir, databin, vocab, argv):
    """Exit status 2 with the reasons on stderr when savedir holds another
    run's checkpoints (:func:`foreign_checkpoints`), else 0."""
    problems = foreign_checkpoints(me, savedir, databin, int(vocab), argv)
    if not problems:
        return 0
    print(
        f"{me}: {savedir} holds checkpoints that are not this run's; refusing to start "
        f"(fairseq-train would resume from them or overwrite them):",
        file=sys.stderr,
    )
    for (what, cont, other), names in problems.items():
        print(f"  {', '.join(names)}: {what}.\n    Either {cont},\n    or {other}.", file=sys.stderr)
    print(
        f"{me}: or set REUSE_SAVEDIR=1 to train in {savedir} anyway (fairseq then resumes from its "
        f"checkpoint_last.pt if that loads, and overwrites checkpoint_best.pt).  Nothing in {savedir} "
        f"was changed.",
        file=sys.stderr,
    )
    return 2


# ---------------------------------------------------------------------------
# score

SPEED_RE = re.compile(r"Translated ([\d,]+) sentences .* in ([\d.]+)s \(([\d.]+) sentences/s, ([\d.]+) tokens/s\)")


def read_hypotheses(gen, detok=lambda t: t):
    """{sentence id: the best detokenized hypothesis} of fairseq-generate's output."""
    hyps = {}
    for line in open(gen, encoding="utf-8"):
        if line.startswith("D-"):  # detokenized hypothesis, best first per id
            sid, _score, *text = line.rstrip("\n").split("\t")
            hyps.setdefault(int(sid[2:]), detok(text[0]) if text else "")
    return hyps


def read_speed(glog):
    """fairseq-generate's 'Translated N sentences ... in S s (...)' of its log, or None."""
    speed = None
    for line in open(glog, encoding="utf-8", errors="replace"):
        m = SPEED_RE.search(line)
        if m:
            speed = {
                "sentences": int(m.group(1).replace(",", "")),
                "seconds": float(m.group(2)),
                "sentences_per_s": float(m.group(3)),
                "tokens_per_s": float(m.group(4)),
            }
    return speed


def score(gen, glog, ref_path, hyp_path, json_path, method, ckpt, word_joiner=False):
    """Write the hypotheses in reference order and their scores; print them.
    A missing hypothesis exits (status 1) naming the count and the first gap."""
    hyps = read_hypotheses(gen, detokenize if word_joiner else (lambda t: t))
    speed = read_speed(glog)
    refs = [line.rstrip("\n") for line in open(ref_path, encoding="utf-8")]
    missing = [i for i in range(len(refs)) if i not in hyps]
    if missing or len(hyps) != len(refs):
        sys.exit(
            f"translate.sh: {len(hyps)} hypotheses for {len(refs)} references "
            f"(first missing id: {missing[:1]}); was a line skipped?"
        )
    out = [hyps[i] for i in range(len(refs))]
    with open(hyp_path, "w", encoding="utf-8") as f:
        f.write("\n".join(out) + "\n")
    bleu = sacrebleu.metrics.BLEU()
    chrf = sacrebleu.metrics.CHRF()
    b = bleu.corpus_score(out, [refs])
    c = chrf.corpus_score(out, [refs])
    res = {
        "method": method,
        "checkpoint": ckpt,
        "hypotheses": hyp_path,
        "reference": ref_path,
        "bleu": round(b.score, 2),
        "bleu_signature": str(bleu.get_signature()),
        "bleu_detail": str(b),
        "chrf": round(c.score, 2),
        "chrf_signature": str(chrf.get_signature()),
        "decoding": speed,
        "search": "factorized" if "--mhce-search" in open(glog, encoding="utf-8", errors="replace").read() else "dense",
    }
    with open(json_path, "w", encoding="utf-8") as f:
        json.dump(res, f, indent=2)
        f.write("\n")
    print(f"BLEU: {b}  ({res['bleu_signature']})")
    print(f"chrF: {c}  ({res['chrf_signature']})")
    if speed:
        print(
            f"decoding: {speed['sentences']} sentences in {speed['seconds']} s, "
            f"{speed['sentences_per_s']} sentences/s (beam 5)"
        )
    print(f"hypotheses: {hyp_path}")
    print(f"score:      {json_path}")
    return 0


# ---------------------------------------------------------------------------


USAGE = """usage: python -m fairseq_mhce.recipes.recipe_checks savedir-guard ME SAVEDIR DATABIN V [FAIRSEQ_TRAIN_ARGS...]
       python -m fairseq_mhce.recipes.recipe_checks score [--word-joiner] GEN GLOG REF HYP JSON METHOD CKPT"""


def main(argv=None):
    """Dispatch on the step name.  The arguments are read by position, not
    by argparse: the fairseq-train arguments after V are passed on as they
    are (whatever options they hold)."""
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    step, rest = (argv[0], argv[1:]) if argv else (None, [])
    if step == "savedir-guard" and len(rest) >= 4 and rest[3].isdigit():
        me, savedir, databin, vocab, *train_args = rest
        return savedir_guard(me, savedir, databin, int(vocab), train_args)
    if step == "score":
        word_joiner = rest[:1] == ["--word-joiner"]
        rest = rest[1:] if word_joiner else rest
        if len(rest) == 7:
            return score(*rest, word_joiner=word_joiner)
    print(USAGE, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
