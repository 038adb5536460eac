// Every call of OpenMeter's JavaScript SDK (@openmeter/sdk) that reaches an endpoint
// pgmeter serves, against the server at argv[2]. Prints one JSON object:
// {call name: {ok: true, value} | {ok: false, status, error}}; tests/test_sdk_js.py
// checks each value. Times are fixed relative to argv[3] (an RFC 3339 instant).
import { OpenMeter } from '@openmeter/sdk'

const [baseUrl, nowText] = process.argv.slice(2)
const om = new OpenMeter({ baseUrl })
const now = new Date(nowText)
const day0 = new Date(Date.UTC(now.getUTCFullYear(), now.getUTCMonth(), now.getUTCDate() - 2))
const hours = (h) => new Date(day0.getTime() + h * 3600 * 1000)
const results = {}

async function call(name, fn) {
  try {
    results[name] = { ok: true, value: await fn() }
  } catch (error) {
    results[name] = { ok: false, status: error.status ?? null, error: String(error.message ?? error) }
  }
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms))
async function waitForEvents(count) {
  for (let i = 0; i < 600; i++) {
    const listed = await om.events.list({ from: day0, limit: 100 })
    if (listed.length >= count) return
    await sleep(50)
  }
  throw new Error(`the sink did not store ${count} events`)
}

await call('meters.create', () => om.meters.create({
  slug: 'tokens', name: 'Tokens', aggregation: 'SUM', eventType: 'call', valueProperty: '$.tokens',
  groupBy: { model: '$.model', region: '$.region' },
}))
await call('events.ingest (one)', () => om.events.ingest({
  id: 'e1', source: 'js', type: 'call', subject: 'alice', time: hours(1),
  data: { tokens: 10, model: 'gpt-4o', region: 'eu' },
}))
await call('events.ingest (batch)', () => om.events.ingest([
  { id: 'e2', source: 'js', type: 'call', subject: 'alice', time: hours(5), data: { tokens: 5, model: 'GPT-4o-mini', region: 'us' } },
  { id: 'e3', source: 'js', type: 'call', subject: 'bob', time: hours(26), data: { tokens: 7, model: 'claude', region: 'eu' } },
  // No id, source or time: the SDK fills them in.
  { type: 'call', subject: 'bob', data: { tokens: 1, model: 'gpt-4o', region: 'ap' } },
]))
await waitForEvents(4)

await call('events.list', async () => (await om.events.list({
  clientId: 'js', from: day0, to: hours(30), subject: 'alice', id: 'e', limit: 10,
  ingestedAtFrom: new Date(now.getTime() - 3600 * 1000), ingestedAtTo: new Date(now.getTime() + 3600 * 1000),
})).map((item) => ({ id: item.event.id, data: item.event.data, stored: item.storedAt instanceof Date })))
await call('events.list customerId', () => om.events.list({ customerId: ['01ARZ3NDEKTSV4RRFFQ69G5FAV'] }))

await call('meters.get', async () => {
  const meter = await om.meters.get('tokens')
  const byId = await om.meters.get(meter.id)
  return { slug: byId.slug, name: meter.name, aggregation: meter.aggregation, groupBy: meter.groupBy }
})
await call('meters.list', async () => (await om.meters.list()).map((m) => m.slug))
await call('meters.update', async () => {
  await om.meters.create({ slug: 'edited', aggregation: 'COUNT', eventType: 'call' })
  const m = await om.meters.update('edited', { name: 'Edited', description: 'd', groupBy: { region: '$.region' }, metadata: { team: 'a' } })
  return { name: m.name, description: m.description, groupBy: m.groupBy, metadata: m.metadata }
})
await call('meters.delete', async () => {
  await om.meters.create({ slug: 'doomed', aggregation: 'COUNT', eventType: 'call' })
  await om.meters.delete('doomed')
  return (await om.meters.list()).map((m) => m.slug).includes('doomed')
})

const rows = (result) => result.data.map((r) => [r.windowStart?.toISOString(), r.subject ?? null, r.groupBy, r.value])
await call('meters.query', async () => rows(await om.meters.query('tokens', {
  clientId: 'js', from: day0, to: hours(48), windowSize: 'DAY', windowTimeZone: 'UTC',
  subject: ['alice', 'bob'], groupBy: ['model'],
})))
await call('meters.query filterGroupBy', async () => rows(await om.meters.query('tokens', {
  filterGroupBy: { model: 'gpt-4o' }, groupBy: ['region'],
})))
// An object here throws inside the SDK (openapi-fetch cannot serialize nested objects);
// the JSON string OpenMeter's document asks for works.
await call('meters.query advancedMeterGroupByFilters', async () => rows(await om.meters.query('tokens', {
  advancedMeterGroupByFilters: JSON.stringify({ model: { $ilike: 'gpt%' }, region: { $or: [{ $eq: 'eu' }, { $eq: 'us' }] } }),
  groupBy: ['model'],
})))
await call('meters.query filterCustomerId', () => om.meters.query('tokens', { filterCustomerId: ['01ARZ3NDEKTSV4RRFFQ69G5FAV'] }))
await call('meters.queryPost', async () => rows(await om.meters.queryPost('tokens', {
  clientId: 'js', from: day0, to: hours(48), windowSize: 'DAY', windowTimeZone: '', subject: ['alice', 'bob'],
  groupBy: ['model'], filterGroupBy: { model: ['gpt-4o', 'claude'] },
})))
await call('meters.queryPost advancedMeterGroupByFilters', async () => rows(await om.meters.queryPost('tokens', {
  groupBy: ['region'], advancedMeterGroupByFilters: { region: { $and: [{ $gte: 'ap' }, { $lt: 'us' }] } },
})))
await call('meters.listGroupByValues', () => om.meters.listGroupByValues('tokens', 'model', { from: day0, to: now }))

process.stdout.write(JSON.stringify(results))
