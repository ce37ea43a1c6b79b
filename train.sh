#!/usr/bin/env bash
# Train through the API (the Docker stack or `make up`): submit one stage or the whole pipeline, then
# follow its log here until it ends. The exit status says whether it finished.
set -euo pipefail
cd "$(dirname "$0")"
# shellcheck source=scripts/lib/common.sh
source scripts/lib/common.sh

usage() {
  cat <<'USAGE'
Usage: ./train.sh base|mid|sft|rl|all [--run=NAME] [--FLAG=VALUE ...]

The classic recipe's stages (nanochat 348fbb3, the seed's four):
  base   base pretraining (base_train)      mid   midtraining (mid_train)
  sft    light chat SFT from mid            rl    RL on GSM8K (chat_rl)
  all    the whole classic pipeline: tokenizer, base, mid, sft, rl, evals (the flags go to base_train)
The current recipe (base, then SFT from base) is ./speedrun.sh's; its SFT alone: ./train.sh sft --recipe=current.

Flags are the program's own, in nanochat's spelling or ours: --depth=20 --num_iterations=100
--device-batch-size=16, plus the runner's: --nproc_per_node=8 (GPUs per worker), --nnodes=2 (workers
that run it together), --max_retries, --time_limit. --run names the run folder (default: default).
The API is API_URL (default http://localhost:$API_PORT, 8000) and the token API_TOKEN, from the
environment or .env.
USAGE
}

[ $# -ge 1 ] || { usage >&2; exit 2; }
case "$1" in
  -h | --help) usage; exit 0 ;;
  base) kind=base_train ;;
  mid) kind=mid_train ;;
  sft) kind=chat_sft ;;
  rl) kind=chat_rl ;;
  all) kind=pipeline ;;
  *) usage >&2; die "unknown stage '$1'" ;;
esac
shift
command -v curl >/dev/null 2>&1 || die "curl is missing"

spec=$(python3 - "$kind" "$@" <<'PY'
import json, sys

kind, flags = sys.argv[1], sys.argv[2:]


def typed(text):
    for parse in (int, float):
        try:
            return parse(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


run, config = "default", {}
for flag in flags:
    if not flag.startswith("--") or "=" not in flag:
        sys.exit(f"train.sh: flags look like --name=value, not {flag!r}")
    name, text = flag[2:].split("=", 1)
    if name == "run":
        run = text
    else:
        config[name.replace("-", "_")] = typed(text)
if kind == "pipeline":
    config = {"recipe": "classic", "base_train": config}
elif kind in ("chat_sft", "chat_rl"):
    config.setdefault("recipe", "classic")
print(json.dumps({"kind": kind, "run": run, "config": config}))
PY
)
run_job "$spec"
