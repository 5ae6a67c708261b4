// Haulage run and step documents, schema 1, as a web frontend reads them.
//
// On Firestore (collection HAULAGE_FIRESTORE_COLLECTION, "tasks" by default) every time is a Firestore
// Timestamp; over Haulage's HTTP service and in the Redis store's documents the same fields are epoch
// seconds (numbers). Use HaulageRunDocument<Timestamp> with the Firebase SDK, HaulageRunDocument<number>
// with the HTTP API. The README's "Progress: run documents, live" section explains each field.
//
//   import type { Timestamp } from "firebase/firestore";
//   import type { HaulageRunDocument, HaulageStepDocument } from "./haulage-documents";
//   onSnapshot(doc(db, "tasks", runId), (snap) => {
//     const run = snap.data() as HaulageRunDocument<Timestamp>;
//     if (run.schema !== 1) throw new Error(`unknown run document schema ${run.schema}`);
//   });

export type HaulageSchemaVersion = 1;

export type HaulageRunStatus = "PENDING" | "PROCESSING" | "COMPLETE" | "FAILED" | "CANCELLED";
export type HaulageStepStatus = "QUEUED" | "RUNNING" | "COMPLETE" | "FAILED" | "CANCELLED";

/** One top-level stage of the plan. A fan-out counts its item steps (items x steps per item). */
export interface HaulageStage {
  name: string;
  kind: "step" | "fan_out";
  /** null for a fan-out not yet expanded; set before any of its items is counted (done + failed <= total). */
  total: number | null;
  done: number;
  failed: number;
  /** 0-100: what ctx.progress last reported in a stage of one step. */
  progress: number;
}

export interface HaulageCounts {
  total: number;
  done: number;
  failed: number;
}

export interface HaulageModelCost {
  /** dollars, exact to the nano-dollar */
  usd: number;
  input_tokens: number;
  output_tokens: number;
  calls: number;
}

export interface HaulageEvent<T> {
  at: T;
  kind: string;
  message: string;
  step: string | null;
}

/** A failed step, with the fan-out item's parameters and label. */
export interface HaulageFailure<T> {
  step: string;
  name: string;
  index: number | null;
  label: string | null;
  /** the item's parameters; on Firestore, params_json (text) holds what a document cannot (arrays in arrays) */
  params: Record<string, unknown> | null;
  params_json?: string;
  error_type: string;
  message: string;
  stage: number | null;
  at: T;
}

/** tasks/{runId} */
export interface HaulageRunDocument<T> {
  schema: HaulageSchemaVersion;
  workflow: string;
  status: HaulageRunStatus;
  /** weighted by work; never goes back; 100 only with COMPLETE */
  percent: number;
  message: string;
  created_by: string | null;
  tags: string[];
  idempotency_key: string | null;
  stages: HaulageStage[];
  steps: HaulageCounts;
  /** the first 100 failed steps (steps.failed counts all) */
  failures: HaulageFailure<T>[];
  cost: Record<string, HaulageModelCost>;
  /** the newest HAULAGE_HISTORY_LIMIT events */
  history: HaulageEvent<T>[];
  result: unknown;
  result_json?: string;
  error: string | null;
  created_at: T;
  updated_at: T;
  started_at: T | null;
  finished_at: T | null;
  /** set once, after the run ended, when the steps still running then have landed; nothing else changes after the end */
  settled: boolean;
  /** Firestore only: the server's time of the last write */
  updated_ts?: T;
  /** Firestore only: when the status last changed (the engine's write barrier) */
  status_at?: T;
}

/** tasks/{runId}/steps/{key}; key like "1:analyze_page[3]" ("/" and "%" percent-encoded in the id) */
export interface HaulageStepDocument<T> {
  key: string;
  name: string;
  status: HaulageStepStatus;
  stage: number | null;
  /** the fan-out item's index; null outside a fan-out */
  index: number | null;
  label: string | null;
  attempt: number;
  percent: number;
  message: string;
  /** "local" | "local-fallback" | "cloudrun" */
  backend: string;
  task_id: string | null;
  execution: string | null;
  error_type: string | null;
  error: string | null;
  started_at: T | null;
  finished_at: T | null;
  updated_at: T | null;
  retry_at: T | null;
}
