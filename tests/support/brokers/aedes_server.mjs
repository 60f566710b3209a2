// A tiny aedes broker for tests: node aedes_server.mjs AEDES_JS PORT [--tls CA CERT KEY] [--keepalive-limit S]
// AEDES_JS is the absolute path of node_modules/aedes/aedes.js in the cached npm install (ESM imports
// do not follow NODE_PATH). Binds 127.0.0.1 only. Sessions live in memory (aedes' default persistence).
import net from 'node:net'
import tls from 'node:tls'
import fs from 'node:fs'
import { pathToFileURL } from 'node:url'

const [aedesJs, port, ...rest] = process.argv.slice(2)
const opts = {}
let tlsFiles = null
for (let i = 0; i < rest.length; i++) {
  if (rest[i] === '--tls') { tlsFiles = rest.slice(i + 1, i + 4); i += 3 }
  else if (rest[i] === '--keepalive-limit') { opts.keepaliveLimit = Number(rest[++i]) }
}
const { Aedes } = await import(pathToFileURL(aedesJs).href)
const broker = await Aedes.createBroker(opts)
const server = tlsFiles
  ? tls.createServer({ ca: fs.readFileSync(tlsFiles[0]), cert: fs.readFileSync(tlsFiles[1]),
    key: fs.readFileSync(tlsFiles[2]), requestCert: true, rejectUnauthorized: true }, broker.handle)
  : net.createServer(broker.handle)
broker.on('client', (c) => console.log(new Date().toISOString(), 'client', c.id))
broker.on('clientDisconnect', (c) => console.log(new Date().toISOString(), 'disconnect', c.id))
broker.on('clientError', (c, err) => console.log(new Date().toISOString(), 'clientError', c && c.id, err.message))
broker.on('connectionError', (c, err) => console.log(new Date().toISOString(), 'connectionError', err.message))
server.listen(Number(port), '127.0.0.1', () => console.log('listening', port))
const shutdown = () => { server.close(); broker.close(() => process.exit(0)) }
process.on('SIGTERM', shutdown)
process.on('SIGINT', shutdown)
