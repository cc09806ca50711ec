// dist/cjs holds CommonJS while the package is "type": "module": say so for that folder.
import { writeFileSync } from "node:fs";
writeFileSync(new URL("../dist/cjs/package.json", import.meta.url), '{"type": "commonjs"}\n');
