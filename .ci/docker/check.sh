#!/usr/bin/env bash
# CI's container checks: build the shipped Dockerfile (on a Debian base bootstrapped from Debian's packages,
# since registry images cannot be pulled here) and run the stages in it as a batch job would: uid 1000,
# /stores and /runs mounted, host network only (docker's default bridge uses a private address range).
#   1. clt-pipe --version
#   2. a harvest stopped with `docker stop` mid-way and started again == an uninterrupted harvest
#      (sha256 of every chunk of every array)
#   3. the same for a fit (sha256 of the final weights), from the store of step 2
#   4. the demo
#   5. a harvest into and a fit from an s3:// store on the radosgw server (.ci/radosgw), when it is up
# Prints the image size and each step's time. A machine where dockerd cannot start gets one line saying the
# checks were skipped; it never passes them silently.
#   .ci/docker/check.sh [WORKDIR]
set -euo pipefail
cd "$(dirname "$0")/../.."
W=${1:-${TMPDIR:-/tmp}/clt-pipe-docker-ci}
IMAGE=clt-pipe:ci
BASE=clt-pipe-ci-base
export DOCKER_BUILDKIT=0  # the legacy builder: Debian's docker.io has no buildx
T0=$(date +%s)
step_t=$T0
step() { local now; now=$(date +%s); echo "docker-ci: $1 ($((now - step_t)) s)"; step_t=$now; }
fail() { echo "docker-ci: FAILED: $*" >&2; exit 1; }

# --- the daemon ---------------------------------------------------------------------------------------------
need=()
for pair in dockerd:docker.io mmdebstrap:mmdebstrap bc:bc radosgw:radosgw ceph-mon:ceph-mon ceph-osd:ceph-osd; do
  command -v "${pair%%:*}" >/dev/null || need+=("${pair#*:}")
done
if [ ${#need[@]} -gt 0 ]; then
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      "${need[@]}" >/dev/null; } || echo "docker-ci: apt-get could not install ${need[*]}"
fi
command -v dockerd >/dev/null && command -v mmdebstrap >/dev/null \
  || { echo "docker-ci: SKIPPED: docker.io/mmdebstrap are not installed and could not be"; exit 0; }
started_dockerd=""
if ! docker info >/dev/null 2>&1; then
  mkdir -p "$W"
  # no bridge, no iptables: containers get the host's network namespace only
  dockerd --bridge=none --iptables=false --ip6tables=false >"$W/dockerd.log" 2>&1 &
  started_dockerd=$!
  for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 0.5; done
  if ! docker info >/dev/null 2>&1; then
    echo "docker-ci: SKIPPED: dockerd could not start here ($(tail -n 1 "$W/dockerd.log"))"
    exit 0
  fi
fi
cleanup() {
  docker rm -f clt-ci-harvest clt-ci-fit >/dev/null 2>&1 || true
  if [ -n "$started_dockerd" ]; then kill "$started_dockerd" 2>/dev/null || true; wait "$started_dockerd" || true; fi
}
trap cleanup EXIT
step "dockerd up"

# --- the image ----------------------------------------------------------------------------------------------
docker image inspect "$BASE" >/dev/null 2>&1 || bash .ci/docker/base.sh "$BASE"
step "base image $BASE"
docker build --quiet --network host --build-arg "BASE=$BASE" -t "$IMAGE" . >/dev/null
echo "docker-ci: image $IMAGE $(docker image inspect -f '{{.Size}}' "$IMAGE" | awk '{printf "%.2f GB", $1/1e9}')"
step "docker build"

rm -rf "$W/stores" "$W/runs"
mkdir -p "$W/stores" "$W/runs"
chown 1000:1000 "$W/stores" "$W/runs"
run() {  # run [docker-run flags...] -- clt-pipe args...
  local flags=()
  while [ "$1" != "--" ]; do flags+=("$1"); shift; done; shift
  docker run --network host --user 1000:1000 -e HF_HUB_OFFLINE=1 \
    -v "$W/stores:/stores" -v "$W/runs:/runs" "${flags[@]}" "$IMAGE" "$@"
}
exit_code() { docker inspect -f '{{.State.ExitCode}}' "$1"; }
# `docker stop` once $2 exists under the host side of the mounts; prints the stop's seconds
stop_when() {
  local name=$1 path=$2 t
  for _ in $(seq 1200); do
    [ -e "$path" ] && break
    [ "$(docker inspect -f '{{.State.Running}}' "$name")" = true ] || fail "$name ended before $path appeared"
    sleep 0.1
  done
  [ -e "$path" ] || fail "$path never appeared"
  t=$(date +%s.%N)
  docker stop "$name" >/dev/null
  echo "$(date +%s.%N) - $t" | bc
}
# stopped_by_docker STAGE CONTAINER PATH: `docker stop` once PATH exists; the stage must print its `stopped:`
# line and exit 143 (SIGTERM reached PID 1 and was handled, not SIGKILLed after the grace)
stopped_by_docker() {
  local secs rc
  secs=$(stop_when "$2" "$3")
  rc=$(exit_code "$2")
  docker logs "$2" 2>&1 | tail -n 2
  docker rm "$2" >/dev/null
  [ "$rc" = 143 ] || fail "$1 after docker stop exited $rc, not 143"
  echo "docker-ci: $1 stopped in ${secs} s, exit $rc"
}
chunk_sums() { (cd "$1" && find . -path '*/c/*' -type f -print0 | sort -z | xargs -0 sha256sum); }

v=$(run --rm -- --version)
echo "docker-ci: $v"
step "clt-pipe --version"

# --- harvest: stopped and resumed == uninterrupted -----------------------------------------------------------
# ViT-B/32 sizes (random init: no weights can be fetched here), 2 images a chunk: 12 shards of 8 images
HARVEST=(harvest --model ViT-B-32 --pretrained none --dataset digits --split train --limit 96 --device cpu
         --batch-size 16 --tokens all --chunk-mb 4 --template-sets single)
run --rm -- "${HARVEST[@]}" --store /stores/ref.zarr >/dev/null
step "harvest, uninterrupted"
run -d --name clt-ci-harvest -- "${HARVEST[@]}" --store /stores/stopped.zarr >/dev/null
stopped_by_docker harvest clt-ci-harvest "$W/stores/stopped.zarr/commits/shard-000000.json"
[ ! -e "$W/stores/stopped.zarr/COMPLETE.json" ] || fail "a stopped harvest claims to be complete"
run --rm -- "${HARVEST[@]}" --store /stores/stopped.zarr >/dev/null
cmp <(chunk_sums "$W/stores/ref.zarr") <(chunk_sums "$W/stores/stopped.zarr") \
  || fail "the resumed harvest's chunks differ from the uninterrupted one's"
echo "docker-ci: harvest resumed: $(chunk_sums "$W/stores/ref.zarr" | wc -l) chunks sha256-identical"
step "harvest, stopped and resumed"

# --- fit: stopped and resumed == uninterrupted ---------------------------------------------------------------
FIT=(fit --store /stores/ref.zarr --n-features 128 --k 8 --steps 60 --batch-size 256 --checkpoint-every 20
     --log-every 5 --device cpu --seed 0)
run --rm -- "${FIT[@]}" --out /runs/fit-ref >/dev/null
step "fit, uninterrupted"
run -d --name clt-ci-fit -- "${FIT[@]}" --out /runs/fit-stopped >/dev/null
stopped_by_docker fit clt-ci-fit "$W/runs/fit-stopped/checkpoints/step-00000020/DONE"
[ ! -e "$W/runs/fit-stopped/clt" ] || fail "a stopped fit wrote its final CLT"
run --rm -- "${FIT[@]}" --out /runs/fit-stopped --resume >/dev/null
a=$(cd "$W/runs/fit-ref/clt" && find . -type f -name '*.safetensors' -print0 | sort -z | xargs -0 sha256sum)
b=$(cd "$W/runs/fit-stopped/clt" && find . -type f -name '*.safetensors' -print0 | sort -z | xargs -0 sha256sum)
[ -n "$a" ] && [ "$a" = "$b" ] || fail "the resumed fit's weights differ from the uninterrupted one's"
echo "docker-ci: fit resumed: $(echo "$a" | wc -l) weight files sha256-identical"
step "fit, stopped and resumed"

# --- the demo -----------------------------------------------------------------------------------------------
run --rm -- demo --workdir /runs/demo | tail -n 6
[ -f "$W/runs/demo/report/report.html" ] || fail "the demo wrote no report"
step "demo"

# --- S3: a harvest into and a fit from radosgw ---------------------------------------------------------------
if [ -x "$(command -v radosgw)" ] && bash .ci/radosgw/start.sh >/dev/null 2>&1; then
  S3=(-e AWS_ENDPOINT_URL=http://127.0.0.1:7480 -e AWS_ACCESS_KEY_ID=clttest -e AWS_SECRET_ACCESS_KEY=clttestsecret
      -e AWS_DEFAULT_REGION=us-east-1)
  bucket=clt-ci-docker-$$
  AWS_ENDPOINT_URL=http://127.0.0.1:7480 AWS_ACCESS_KEY_ID=clttest AWS_SECRET_ACCESS_KEY=clttestsecret \
    python -c "import s3fs, sys; s3fs.S3FileSystem().mkdir(sys.argv[1])" "$bucket"
  run --rm "${S3[@]}" -- harvest --model ViT-B-32 --pretrained none --dataset digits --split train --limit 32 \
    --device cpu --batch-size 16 --tokens all --template-sets single --store "s3://$bucket/b32.zarr" >/dev/null
  run --rm "${S3[@]}" -- fit --store "s3://$bucket/b32.zarr" --out /runs/fit-s3 --n-features 128 --k 8 --steps 20 \
    --batch-size 256 --device cpu >/dev/null
  [ -d "$W/runs/fit-s3/clt" ] || fail "the fit from s3:// wrote no CLT"
  step "harvest to and fit from s3://$bucket (radosgw)"
else
  echo "docker-ci: s3 check SKIPPED: radosgw could not be started here (apt-get install ceph-mon ceph-osd radosgw)"
fi
echo "docker-ci: all checks passed in $(($(date +%s) - T0)) s"
