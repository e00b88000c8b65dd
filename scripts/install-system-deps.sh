#!/usr/bin/env bash
# Installs the Debian packages the test suite needs: espeak-ng synthesizes the speech the
# transcription tests listen to; chromium is the browser the page's end-to-end tests drive
# through Playwright (whose own browser downloads are never used); redis-server is the private
# Redis a test starts and kills (rate limits that outlive their storage); nginx is the buffering
# front of deploy/nginx.conf that a test puts before the server. The server itself needs none:
# PyAV wheels bundle FFmpeg. Only missing packages are installed. The dpkg lock may
# be held by another apt run on the same machine: then this waits and retries.
set -euo pipefail

missing=()
command -v espeak-ng >/dev/null 2>&1 || missing+=(espeak-ng)
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || missing+=(nginx-light)

if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi

if [ "$(id -u)" -eq 0 ]; then
  SUDO=""
elif command -v sudo >/dev/null 2>&1; then
  SUDO="sudo"
else
  echo "install-system-deps: missing ${missing[*]}; install them with your package manager" >&2
  exit 1
fi

# apt waits up to this long for a dpkg lock held by someone else, then the whole step retries.
apt_opts=(-o DPkg::Lock::Timeout=120)
export DEBIAN_FRONTEND=noninteractive
echo "install-system-deps: installing ${missing[*]}"
for attempt in 1 2 3 4 5; do
  if $SUDO apt-get "${apt_opts[@]}" update -qq &&
    $SUDO apt-get "${apt_opts[@]}" install -y -qq --no-install-recommends "${missing[@]}" \
      >/dev/null; then
    exit 0
  fi
  echo "install-system-deps: apt failed (attempt ${attempt}; lock held?), retrying" >&2
  sleep $((attempt * 10))
done
echo "install-system-deps: could not install ${missing[*]}" >&2
exit 1
