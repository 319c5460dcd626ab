#!/usr/bin/env bash
# Make sure Fashion-MNIST (Debian's dataset-fashion-mnist) is installed: apt-get when we are root,
# otherwise one line saying the exact command to run. Also installs `chromium` for the browser test
# when asked (`ensure_data.sh --browser`, used by CI).
set -euo pipefail
FMNIST=/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
want=(dataset-fashion-mnist)
[ "${1:-}" = "--browser" ] && want+=(chromium)
missing=()
for pkg in "${want[@]}"; do
  case "$pkg" in
    dataset-fashion-mnist) [ -f "$FMNIST" ] || missing+=("$pkg") ;;
    chromium) command -v chromium >/dev/null 2>&1 || missing+=("$pkg") ;;
  esac
done
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ]; then
  echo "dinokit needs ${missing[*]}: run  sudo apt-get update && sudo apt-get install -y ${missing[*]}" >&2
  exit 1
fi
echo "installing ${missing[*]} (apt-get) ..." >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq "${missing[@]}" >/dev/null
