// The npm tensorlake SDK builds an image from a TypeScript Image definition through
// `localsbx serve` (the legacy template flow 0.5.89 uses), then starts a sandbox from it.
import { Image, Sandbox } from "tensorlake";

const [name, base] = [process.argv[2], process.argv[3] ?? "debian-minimal"];
const img = new Image({ name, baseImage: base })
  .run("echo from-ts > /ts.txt")
  .env("TS_ENV", "yes")
  .workdir("/srv");
const template = await img.build();
const sb = await Sandbox.create({ image: name });
let r;
try {
  r = await sb.run("sh", { args: ["-c", 'cat /ts.txt; echo "$TS_ENV"; pwd'] });
} finally {
  await sb.terminate();
}
console.log(JSON.stringify({ template: { id: template.id, name: template.name }, stdout: r.stdout }));
