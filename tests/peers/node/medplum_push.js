// Calls the real @medplum/core MedplumClient.pushToAgent against our relay.
// node medplum_push.js BASE_URL TOKEN AGENT_ID DESTINATION BODY_FILE WAIT(true|false)
const fs = require('node:fs');
const { MedplumClient } = require('@medplum/core');
const [baseUrl, token, agentId, destination, bodyFile, wait] = process.argv.slice(2);
const medplum = new MedplumClient({ baseUrl, fetch: globalThis.fetch });
medplum.setAccessToken(token);
const body = fs.readFileSync(bodyFile, 'utf8');
(async () => {
  try {
    const result = await medplum.pushToAgent(
      { resourceType: 'Agent', id: agentId }, destination, body,
      'x-application/hl7-v2+er7', wait === 'true', { waitTimeout: 10000 });
    console.log('RESULT ' + JSON.stringify(result));
  } catch (e) {
    console.log('ERROR ' + e.message);
    process.exitCode = 1;
  }
})();
