// The type generator (Node only; `patchbay-shim types` runs it).

/** The TypeScript module for `manifest` (the merged `actions/*.json`, as `GET /actions` serves
 *  it): the typed manifest, and per action its payload and response types, constants, request
 *  creator, success and failure guards, and the `Replies` map. Needs json-schema-to-typescript. */
export function generateTypes (manifest: Record<string, unknown>): Promise<string>

/** `NOTES_FETCH` → `NotesFetch`: how the generated types are named. */
export function pascal (name: string): string

/** `NOTES_FETCH` → `notesFetch`: how a request creator is named (`DELETE` → `deleteRequest`). */
export function creatorName (name: string): string
