#!/usr/bin/env node
// patchbay-shim types (--actions DIR | --url URL) [--out FILE]
//   Writes a TypeScript module from patchbay's manifests (see src/types.js): read from the
//   `actions/*.json` files of DIR, merged, or from a running patchbay's `GET /actions`.

import { readdir, readFile, writeFile } from 'node:fs/promises'
import { join } from 'node:path'
import { generateTypes } from '../src/types.js'

const USAGE = 'usage: patchbay-shim types (--actions DIR | --url URL) [--out FILE]'

async function manifestFrom ({ actions, url }) {
  if (url) {
    const base = url.replace(/\/+$/, '')
    const res = await fetch(base.endsWith('/actions') ? base : `${base}/actions`)
    if (!res.ok) throw new Error(`${url}: GET /actions answered ${res.status}`)
    return res.json()
  }
  const merged = {}
  const files = (await readdir(actions)).filter(f => f.endsWith('.json')).sort()
  if (files.length === 0) throw new Error(`${actions}: no .json manifests`)
  for (const file of files) {
    let json
    try {
      json = JSON.parse(await readFile(join(actions, file), 'utf8'))
    } catch (e) {
      throw new Error(`${join(actions, file)}: ${e.message}`)
    }
    for (const name of Object.keys(json)) {
      if (Object.hasOwn(merged, name)) throw new Error(`${join(actions, file)}: action ${name} is defined twice`)
    }
    Object.assign(merged, json)
  }
  return merged
}

async function main (argv) {
  const [command, ...rest] = argv
  if (command !== 'types') throw new Error(USAGE)
  const o = {}
  for (let i = 0; i < rest.length; i++) {
    const flag = rest[i]
    const value = rest[++i]
    if (!['--actions', '--url', '--out'].includes(flag) || value === undefined) throw new Error(USAGE)
    o[flag.slice(2)] = value
  }
  if (!o.actions === !o.url) throw new Error(USAGE)
  const text = await generateTypes(await manifestFrom(o))
  if (o.out) await writeFile(o.out, text)
  else process.stdout.write(text)
}

main(process.argv.slice(2)).catch(e => {
  console.error(`patchbay-shim: ${e.message}`)
  process.exit(2)
})
