#!/usr/bin/env bash
# Deploy Haulage on Cloud Run: the job for long steps, the worker services, their service
# accounts and the IAM between them. Idempotent: re-run it to roll out a new image.
#
#   PROJECT=my-project REGION=europe-west1 IMAGE=<your image reference> \
#   REDIS_URL=redis://10.0.0.3:6379/0 VPC_CONNECTOR=haulage-connector ./deploy/cloudrun/deploy.sh
#
# Needs: gcloud (authenticated, with rights to manage Cloud Run and IAM), envsubst (gettext), and for the
# Firestore rules and indexes (step 5) the Firebase CLI: `firebase` on PATH, or npx (Node) to run firebase-tools.
# SKIP_FIRESTORE_RULES=1 skips step 5 (say the rules are managed elsewhere).
set -euo pipefail

: "${PROJECT:?set PROJECT}" "${REGION:?set REGION}" "${IMAGE:?set IMAGE (the image built from the Dockerfile)}"
: "${REDIS_URL:?set REDIS_URL (Memorystore, reached through VPC_CONNECTOR)}" "${VPC_CONNECTOR:?set VPC_CONNECTOR}"
export PROJECT REGION IMAGE REDIS_URL VPC_CONNECTOR
export JOB="${JOB:-haulage-step}"
export HAULAGE_MODULES="${HAULAGE_MODULES:-workflows}"
HERE="$(cd "$(dirname "$0")" && pwd)"
RENDERED="$(mktemp -d)"
trap 'rm -rf "$RENDERED"' EXIT
gcloud config set project "$PROJECT" >/dev/null

# Only the listed variables are substituted: "$PORT" in the worker's command stays for Cloud Run.
VARS='${PROJECT} ${REGION} ${IMAGE} ${REDIS_URL} ${VPC_CONNECTOR} ${JOB} ${HAULAGE_MODULES} ${SERVICE} ${QUEUES} ${CONCURRENCY} ${MIN_INSTANCES} ${MAX_INSTANCES}'
render() { envsubst "$VARS" <"$HERE/$1" >"$RENDERED/$2"; }

# 1. Service accounts: one for the workers (they trigger and follow executions), one for the job's tasks.
for sa in haulage-worker haulage-job; do
  gcloud iam service-accounts describe "$sa@$PROJECT.iam.gserviceaccount.com" >/dev/null 2>&1 ||
    gcloud iam service-accounts create "$sa" --display-name "Haulage ${sa#haulage-}"
done
for sa in haulage-worker haulage-job; do  # both read and write progress documents
  gcloud projects add-iam-policy-binding "$PROJECT" --condition=None --quiet \
    --member "serviceAccount:$sa@$PROJECT.iam.gserviceaccount.com" --role roles/datastore.user >/dev/null
done

# 1b. Secrets (Secret Manager), mounted as files because the job trusts nothing in its environment:
#    haulage-handoff-key (random, made once; the workers sign each hand-off with it, the job checks) and
#    haulage-job-config (the job's settings: Redis URL, store, modules; a new version when it changes).
#    Each account reads only what it needs, granted on the secret, not the project.
ensure_secret() { gcloud secrets describe "$1" >/dev/null 2>&1 || gcloud secrets create "$1" --replication-policy automatic >/dev/null; }
ensure_secret haulage-handoff-key
if ! gcloud secrets versions describe latest --secret haulage-handoff-key >/dev/null 2>&1; then
  head -c 48 /dev/urandom | base64 | tr -d '\n' | gcloud secrets versions add haulage-handoff-key --data-file=- >/dev/null
fi
ensure_secret haulage-job-config
render job-config.json job-config.json
if ! gcloud secrets versions access latest --secret haulage-job-config 2>/dev/null | cmp -s - "$RENDERED/job-config.json"; then
  gcloud secrets versions add haulage-job-config --data-file "$RENDERED/job-config.json" >/dev/null
fi
grant_secret() {
  gcloud secrets add-iam-policy-binding "$1" --member "serviceAccount:$2@$PROJECT.iam.gserviceaccount.com" \
    --role roles/secretmanager.secretAccessor --condition=None --quiet >/dev/null
}
grant_secret haulage-handoff-key haulage-job
grant_secret haulage-handoff-key haulage-worker
grant_secret haulage-job-config haulage-job

# 2. The job that runs long steps (python -I -m haulage.dispatch.job), one execution per step attempt.
render job.yaml job.yaml
gcloud run jobs replace "$RENDERED/job.yaml" --region "$REGION"

# 3. The workers may run that job with overrides, follow and cancel its executions: a custom role
#    with exactly that, granted on the job only (roles/run.developer would also do, with more).
if gcloud iam roles describe haulageDispatcher --project "$PROJECT" >/dev/null 2>&1; then
  gcloud iam roles update haulageDispatcher --project "$PROJECT" --file "$HERE/dispatcher-role.yaml" --quiet >/dev/null
else
  gcloud iam roles create haulageDispatcher --project "$PROJECT" --file "$HERE/dispatcher-role.yaml"
fi
gcloud run jobs add-iam-policy-binding "$JOB" --region "$REGION" \
  --member "serviceAccount:haulage-worker@$PROJECT.iam.gserviceaccount.com" \
  --role "projects/$PROJECT/roles/haulageDispatcher"

# 4. Worker services, CPU always allocated, never scaled to zero:
#    short steps and the small tasks that drive executions; and a pool for the `long` queue,
#    which serves steps that fall back when Cloud Run Jobs cannot be triggered.
deploy_workers() {
  export SERVICE="$1" QUEUES="$2" CONCURRENCY="$3" MIN_INSTANCES="$4" MAX_INSTANCES="$5"
  render worker-service.yaml "$SERVICE.yaml"
  gcloud run services replace "$RENDERED/$SERVICE.yaml" --region "$REGION"
}
deploy_workers haulage-worker short,dispatch 4 1 10
deploy_workers haulage-worker-long long 1 1 4

# 5. Firestore: the security rules web clients read under (haulage/progress/firestore/firestore.rules) and the composite indexes
#    of every query Haulage makes (deploy/firestore.indexes.json), both from deploy/firebase.json.
#    gcloud has no command for security rules; the Firebase CLI deploys both, idempotently.
if [ "${SKIP_FIRESTORE_RULES:-}" != 1 ]; then
  if command -v firebase >/dev/null 2>&1; then FIREBASE=(firebase); else FIREBASE=(npx --yes firebase-tools); fi
  (cd "$HERE/.." && "${FIREBASE[@]}" deploy --only firestore:rules,firestore:indexes --project "$PROJECT" \
    --config firebase.json --non-interactive)
fi

echo "Haulage deployed: job projects/$PROJECT/locations/$REGION/jobs/$JOB, services haulage-worker and haulage-worker-long"
