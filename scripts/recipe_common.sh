# Sourced by scripts/train.sh and scripts/translate.sh (not run by itself).
#
#   recipe_setup SCRIPT_NAME TOOL "$@"    (then: shift 3)
#
# With fewer than three arguments prints the calling script's header comment
# (its usage) and exits 2.  Otherwise sets METHOD DATABIN SAVEDIR (the first
# three arguments), REPO (this checkout), BIN (the directory holding the fairseq console
# script TOOL: $FAIRSEQ_BIN, else $VENV/bin with VENV defaulting to
# REPO/.venv, else the one on PATH) and SRC / TGT (the language pair of the
# data-bin's train.SRC-TGT.*.idx).  Stops with exit status 2 and a message
# saying what to do when the tool or the data-bin is missing.
recipe_setup() {
  local me=$1 tool=$2 found pair
  shift 2
  if [ $# -lt 3 ]; then
    sed -n '2,/^[^#]/s/^# \{0,1\}//p' "$0"  # the header comment, up to the first code line
    exit 2
  fi
  METHOD=$1 DATABIN=$2 SAVEDIR=$3
  REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
  VENV=${VENV:-$REPO/.venv}
  BIN=${FAIRSEQ_BIN:-$VENV/bin}
  if [ ! -x "$BIN/$tool" ]; then
    found=$(command -v "$tool" || true)
    if [ -z "$found" ]; then
      echo "$me: $tool is neither in $BIN nor on PATH; run 'make install' (creates $REPO/.venv)" \
           "or point VENV / FAIRSEQ_BIN at an environment with fairseq" >&2
      exit 2
    fi
    BIN=$(dirname "$found")
  fi
  [ -d "$DATABIN" ] || { echo "$me: no data-bin at $DATABIN" >&2; exit 2; }
  pair=$(ls "$DATABIN" | sed -n 's/^train\.\([^.]*\)-\([^.]*\)\..*\.idx$/\1-\2/p' | head -1)
  if [ -z "$pair" ]; then
    echo "$me: $DATABIN has no train.SRC-TGT.*.idx; is it a fairseq-preprocess data-bin" \
         "(e.g. from scripts/prepare_data.py)?" >&2
    exit 2
  fi
  SRC=${pair%-*} TGT=${pair#*-}
}

# savedir_guard SCRIPT_NAME SAVEDIR DATABIN V -- FAIRSEQ_TRAIN_ARGS...
#
# Stops with exit status 2 (and changes nothing) when SAVEDIR holds
# checkpoints (checkpoint*.pt) that are not this run's: another method
# (softmax / adaptive / mhp / mhe / mhs), other head sizes (or adaptive
# cutoffs), another architecture or another data-bin than the fairseq-train
# arguments given (read last-wins, as argparse does).  Each checkpoint's saved
# config is read with torch.load(mmap=True), so even large ones take a moment.
# REUSE_SAVEDIR=1 skips the check.  A save directory without checkpoints costs
# nothing (no Python is started).
savedir_guard() {
  local me=$1 savedir=$2 databin=$3 vocab=$4 py=$BIN/python
  shift 5  # the four above and the '--'
  [ "${REUSE_SAVEDIR:-0}" = 1 ] && return 0
  compgen -G "$savedir/checkpoint*.pt" >/dev/null || return 0
  [ -x "$py" ] || py=$(command -v python3 || echo python)
  "$py" - "$me" "$savedir" "$databin" "$vocab" "$REPO" "$@" <<'PY'
import glob, os, sys

me, savedir, databin, vocab, repo = sys.argv[1:6]
argv = sys.argv[6:]
vocab = int(vocab)


def last(flag, default=None):
    """The value fairseq-train will see for FLAG (argparse: the last one wins)."""
    val = default
    for i, a in enumerate(argv):
        if a == flag and i + 1 < len(argv):
            val = argv[i + 1]
        elif a.startswith(flag + "="):
            val = a[len(flag) + 1:]
    return val


def method_of(arch, mhce_method, cutoff):
    if str(arch).endswith("_mhce"):
        return str(mhce_method or "mhe")
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


def auto_sizes(method, heads):
    sys.path.insert(0, repo)
    import fairseq_mhce  # noqa: F401  (registers the heads)
    from fairseq_mhce.modules.output_layer import head_class

    return list(head_class(method).default_head_sizes(vocab, int(heads)))


run = {
    "arch": last("--arch"),
    "method": method_of(last("--arch"), last("--mhce-method"), last("--adaptive-softmax-cutoff")),
    "cutoff": last("--adaptive-softmax-cutoff"),
}
try:
    run["heads"], run["sizes"] = int(last("--mhce-heads", 2)), parse_sizes(last("--mhce-head-sizes"))
except ValueError:  # a malformed value: fairseq-train explains it; no head sizes to compare
    run["heads"] = run["sizes"] = "?"

import torch  # noqa: E402


def load(path):
    try:
        return torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception:  # not a zip-format file: mmap is not possible
        return torch.load(path, map_location="cpu", weights_only=False)


def get(ns, key, default=None):
    if ns is None:
        return default
    if isinstance(ns, dict):
        return ns.get(key, default)
    return getattr(ns, key, default)


def same_path(a, b):
    if a is None:
        return True  # nothing recorded: nothing to compare
    return os.path.realpath(str(a)) == os.path.realpath(str(b)) or str(a) == str(b)


problems = {}  # (what, continue, otherwise) -> [checkpoint names]


def refuse(name, what, cont, other):
    problems.setdefault((what, cont, other), []).append(name)


new_dir = "a new SAVEDIR (a directory without checkpoint*.pt)"
for path in sorted(glob.glob(os.path.join(glob.escape(savedir), "checkpoint*.pt"))):
    name = os.path.basename(path)
    try:
        state = load(path)
        cfg = state.get("cfg") or {}
        model = get(cfg, "model") or state.get("args")
        if model is None:
            raise ValueError("no saved config (cfg / args)")
    except Exception as e:  # truncated, not a checkpoint, ...
        refuse(name, f"cannot be read ({type(e).__name__}: {str(e)[:200]}), so whose run it is is unknown",
               f"move it out of {savedir}", f"train in {new_dir}")
        continue
    arch = get(model, "arch") or get(model, "_name")  # argparse config / hydra config
    cutoff = get(model, "adaptive_softmax_cutoff")
    ck_method = method_of(arch, get(model, "mhce_method"), cutoff)
    ck_data = get(get(cfg, "task"), "data") or get(model, "data")
    if ck_method != run["method"]:
        refuse(name, f"trained with METHOD {ck_method} (--arch {arch}); this run is METHOD {run['method']}",
               f"continue that run with METHOD {ck_method} (scripts/{me} {ck_method} {ck_data or 'DATABIN'} "
               f"{savedir} ...)", f"train {run['method']} in {new_dir}")
        continue
    if run["arch"] is not None and arch is not None and arch != run["arch"]:
        refuse(name, f"trained with --arch {arch}; this run has --arch {run['arch']}",
               f"continue that run with --arch {arch}", f"train --arch {run['arch']} in {new_dir}")
        continue
    if ck_method in ("mhp", "mhe", "mhs") and run["heads"] != "?":
        ck_spec = parse_sizes(get(model, "mhce_head_sizes"))
        ck_heads = int(get(model, "mhce_heads", 2) or 2)
        ck_sizes = next((t.tolist() for k, t in state["model"].items()
                         if k.endswith("mhce_head.codec.head_sizes")), ck_spec)
        if ck_spec is None and run["sizes"] is None:  # both automatic on one V: the same iff the same H
            same = ck_method == "mhs" or ck_heads == run["heads"]
        else:
            try:
                same = (ck_sizes or auto_sizes(ck_method, ck_heads)) == (
                    run["sizes"] or auto_sizes(run["method"], run["heads"]))
            except ValueError:  # sizes the plugin refuses: fairseq-train says why
                same = True
        if not same:
            ck_desc = sizes_str(ck_sizes) if ck_sizes else "automatic"
            ck_how = f"--mhce-head-sizes {sizes_str(ck_spec)}" if ck_spec else f"--mhce-heads {ck_heads}"
            run_desc = (f"--mhce-head-sizes {sizes_str(run['sizes'])}" if run["sizes"]
                        else f"automatic sizes for --mhce-heads {run['heads']}")
            refuse(name, f"trained with head sizes {ck_desc} ({ck_how}); this run has {run_desc}",
                   f"continue that run with {ck_how}", f"train these sizes in {new_dir}")
            continue
    if ck_method == "adaptive" and cutoff_list(cutoff) != cutoff_list(run["cutoff"]):
        ck_cut = ",".join(map(str, cutoff_list(cutoff)))
        refuse(name, f"trained with --adaptive-softmax-cutoff {ck_cut}; this run has {run['cutoff']}",
               f"continue that run with ADAPTIVE_CUTOFF={ck_cut}", f"train this cutoff in {new_dir}")
        continue
    if not same_path(ck_data, databin):
        refuse(name, f"trained on the data-bin {ck_data}; this run's is {databin}",
               f"continue that run with DATABIN {ck_data}", f"train on {databin} in {new_dir}")

if problems:
    print(f"{me}: {savedir} holds checkpoints that are not this run's; refusing to start "
          f"(fairseq-train would resume from them or overwrite them):", file=sys.stderr)
    for (what, cont, other), names in problems.items():
        print(f"  {', '.join(names)}: {what}.\n    Either {cont},\n    or {other}.", file=sys.stderr)
    print(f"{me}: or set REUSE_SAVEDIR=1 to train in {savedir} anyway (fairseq then resumes from its "
          f"checkpoint_last.pt if that loads, and overwrites checkpoint_best.pt).  Nothing in {savedir} "
          f"was changed.", file=sys.stderr)
    sys.exit(2)
PY
}
