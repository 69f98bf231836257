// The npm tensorlake SDK against `localsbx serve`: create, run, files, terminate.
// Prints one JSON line of what it saw; tests/sdk/test_sdk_typescript.py checks it.
import { Sandbox } from "tensorlake";

const image = process.argv[2] ?? "debian-minimal";
const sb = await Sandbox.create({ image });
const seen = { sandboxId: sb.sandboxId };
try {
  const r = await sb.run("sh", { args: ["-c", "echo ts-out; echo ts-err >&2; exit 5"] });
  seen.run = { exitCode: r.exitCode, stdout: r.stdout, stderr: r.stderr };
  await sb.writeFile("/tmp/ts.txt", new TextEncoder().encode("written by node"));
  seen.read = new TextDecoder().decode(await sb.readFile("/tmp/ts.txt"));
  const env = await sb.run("sh", { args: ["-c", "echo $FOO; pwd"], env: { FOO: "bar" }, workingDir: "/tmp" });
  seen.env = env.stdout;
} finally {
  await sb.terminate();
}
seen.terminated = true;
console.log(JSON.stringify(seen));
