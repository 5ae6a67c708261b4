// A frontend's view of one Haulage run: the Firebase web SDK against the Firestore emulator, with the
// identities a signed-in user's browser sends (mockUserToken), under deploy/firestore.rules.
//
// Started by tests/frontend/test_frontend.py with:
//   FIRESTORE_EMULATOR_HOST, PROJECT, COLLECTION, RUN_ID, OWNER_UID, OWNER_EMAIL, DEADLINE_MS
// It subscribes to the run document and its steps until the run is settled, checks what a progress page
// relies on, and prints one JSON line: {"ok": bool, "problems": [...], ...}. Exit code 0 when ok.
import { initializeApp } from "firebase/app";
import {
  collection,
  connectFirestoreEmulator,
  doc,
  getDoc,
  getDocs,
  getFirestore,
  onSnapshot,
  query,
  where,
} from "firebase/firestore";

const env = process.env;
const [host, port] = env.FIRESTORE_EMULATOR_HOST.split(":");
const deadline = Date.now() + Number(env.DEADLINE_MS || 90000);

function client(name, token) {
  const app = initializeApp({ projectId: env.PROJECT, apiKey: "fake-api-key" }, name);
  const db = getFirestore(app);
  connectFirestoreEmulator(db, host, Number(port), { mockUserToken: token });
  return db;
}

// The run's created_by is the owner's email; their token says it is verified. The forger's says it is not.
const owner = client("owner", { sub: env.OWNER_UID, user_id: env.OWNER_UID, email: env.OWNER_EMAIL, email_verified: true });
const outsider = client("outsider", { sub: "someone-else", user_id: "someone-else" });
const forger = client("forger", { sub: "mallory", email: env.OWNER_EMAIL, email_verified: false });

const problems = [];
const runs = [];
const rows = new Map(); // step key -> every status it was seen in
let stepsSeen = [];

function millis(t) {
  return t && typeof t.toMillis === "function" ? t.toMillis() : null;
}

// The emulator's listen stream can break (firebase-tools issue 8654), and a run not yet created is
// refused: resubscribe, within the deadline.
function follow(ref, onData) {
  return new Promise((resolve) => {
    let unsubscribe = () => {};
    const start = () => {
      unsubscribe = onSnapshot(
        ref,
        (snap) => {
          if (onData(snap)) {
            unsubscribe();
            resolve(true);
          }
        },
        (err) => {
          if (Date.now() > deadline) return resolve(false);
          // permission-denied until the run document exists (the rules read its created_by)
          if (err.code !== "permission-denied") console.error(`listener error (${err.code}); subscribing again`);
          setTimeout(start, 200);
        },
      );
    };
    start();
    const timer = setInterval(() => {
      if (Date.now() > deadline) {
        clearInterval(timer);
        unsubscribe();
        resolve(false);
      }
    }, 250);
  });
}

console.log("ready"); // the test starts the run now; until it exists the rules refuse the read and we retry
const runRef = doc(owner, env.COLLECTION, env.RUN_ID);
const stepsRef = collection(owner, env.COLLECTION, env.RUN_ID, "steps");
let runSettled = false;
const stepsDone = follow(stepsRef, (snap) => {
  for (const d of snap.docs) {
    const s = d.data();
    if (!rows.has(s.key)) rows.set(s.key, new Set());
    rows.get(s.key).add(s.status);
  }
  return runSettled;
});
const settled = await follow(runRef, (snap) => {
  if (!snap.exists()) return false;
  runs.push(snap.data());
  return snap.data().settled === true;
});
runSettled = true;
stepsSeen = (await getDocs(stepsRef)).docs.map((d) => d.data()); // the rows as they ended
await Promise.race([stepsDone, new Promise((r) => setTimeout(r, 1000))]);
if (!settled) problems.push("the run never settled before the deadline");

// --- what a progress bar relies on, snapshot by snapshot -------------------------------------------------
const ended = runs.findIndex((r) => ["COMPLETE", "FAILED", "CANCELLED"].includes(r.status));
for (let i = 0; i < runs.length; i++) {
  const r = runs[i];
  if (r.schema !== 1) problems.push(`snapshot ${i}: schema ${r.schema}`);
  if (r.percent >= 100 && r.status !== "COMPLETE") problems.push(`snapshot ${i}: percent ${r.percent} while ${r.status}`);
  for (const s of r.stages || []) {
    if (s.total !== null && s.done + s.failed > s.total) problems.push(`snapshot ${i}: stage ${s.name} ${s.done}+${s.failed} > ${s.total}`);
  }
  if (millis(r.created_at) === null || millis(r.updated_at) === null) problems.push(`snapshot ${i}: times are not Timestamps`);
  if ("params" in r || "heartbeat" in r || "params_hash" in r) problems.push(`snapshot ${i}: internal fields in the document`);
  if (i > 0) {
    const p = runs[i - 1];
    if (r.percent < p.percent) problems.push(`snapshot ${i}: percent went back ${p.percent} -> ${r.percent}`);
    if (r.steps.done < p.steps.done || r.steps.failed < p.steps.failed) problems.push(`snapshot ${i}: counts went back`);
    (r.stages || []).forEach((s, j) => {
      const q = (p.stages || [])[j];
      if (q && (s.done < q.done || s.failed < q.failed)) problems.push(`snapshot ${i}: stage ${s.name} went back`);
    });
  }
}
if (ended < 0) problems.push("no terminal snapshot");
else {
  const flat = (r) => {
    const out = {};
    for (const k of Object.keys(r).sort()) if (k !== "settled") out[k] = JSON.stringify(r[k]);
    return out;
  };
  const at = flat(runs[ended]);
  for (let i = ended + 1; i < runs.length; i++) {
    const later = flat(runs[i]);
    const moved = [...new Set([...Object.keys(at), ...Object.keys(later)])].filter((k) => at[k] !== later[k]);
    if (moved.length) problems.push(`snapshot ${i}: ${moved.join(", ")} changed after ${runs[ended].status}`);
  }
}
const last = runs[runs.length - 1] || {};

// --- per-item rows and failures ---------------------------------------------------------------------------
const items = stepsSeen.filter((s) => s.index !== null && s.index !== undefined);
const everQueued = [...rows.values()].filter((st) => st.has("QUEUED")).length;
for (const s of items) {
  if (!s.label) problems.push(`row ${s.key} has no label`);
  if (s.status === "COMPLETE" && (millis(s.started_at) === null || millis(s.finished_at) === null)) {
    problems.push(`row ${s.key} has no started/finished times`);
  }
}
const failures = (last.failures || []).map((f) => ({ step: f.step, label: f.label, params: f.params, error_type: f.error_type }));

// --- another identity is refused ---------------------------------------------------------------------------
async function refused(promise) {
  try {
    await promise;
    return false;
  } catch (err) {
    return err.code === "permission-denied";
  }
}
const outsiderRefused = await refused(getDoc(doc(outsider, env.COLLECTION, env.RUN_ID)));
const outsiderStepsRefused = await refused(getDocs(collection(outsider, env.COLLECTION, env.RUN_ID, "steps")));
const forgedEmailRefused = await refused(getDoc(doc(forger, env.COLLECTION, env.RUN_ID)));
const outsiderListRefused = await refused(
  getDocs(query(collection(outsider, env.COLLECTION), where("created_by", "==", env.OWNER_EMAIL))),
);
const ownerList = await getDocs(query(collection(owner, env.COLLECTION), where("created_by", "==", env.OWNER_EMAIL)));
const ownerPrivateRefused = await refused(getDoc(doc(owner, env.COLLECTION, env.RUN_ID, "private", "engine")));
for (const [what, ok] of Object.entries({ outsiderRefused, outsiderStepsRefused, forgedEmailRefused, outsiderListRefused, ownerPrivateRefused })) {
  if (!ok) problems.push(`${what} is false`);
}

console.log(JSON.stringify({
  ok: problems.length === 0,
  problems,
  snapshots: runs.length,
  statuses: runs.map((r) => r.status),
  percents: runs.map((r) => r.percent),
  final: { status: last.status, percent: last.percent, message: last.message, settled: last.settled, stages: last.stages },
  failures,
  rows: items.length,
  rows_seen_queued: everQueued,
  owner_listed: ownerList.docs.map((d) => d.id).includes(env.RUN_ID),
}));
process.exit(problems.length === 0 ? 0 : 1);
