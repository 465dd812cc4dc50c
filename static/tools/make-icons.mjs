// make-icons.mjs — generates static/icons/icon-192.png and icon-512.png once (they are
// committed; the build only copies and fingerprints them). A tiny PNG encoder on node:zlib:
// a full-bleed brand-green square (so the same file works as a maskable icon) with a white
// shopping bag drawn inside the central 60 % (inside the maskable safe zone, radius 40 %).
// Run: node static/tools/make-icons.mjs
import { writeFileSync } from "node:fs";
import { deflateSync } from "node:zlib";

const GREEN = [0x0b, 0x5d, 0x1e];
const WHITE = [0xff, 0xff, 0xff];

const CRC_TABLE = Array.from({ length: 256 }, (_, n) => {
  let c = n;
  for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
  return c >>> 0;
});
function crc32(buf) {
  let c = 0xffffffff;
  for (const b of buf) c = CRC_TABLE[(c ^ b) & 0xff] ^ (c >>> 8);
  return (c ^ 0xffffffff) >>> 0;
}
function chunk(type, data) {
  const len = Buffer.alloc(4);
  len.writeUInt32BE(data.length);
  const body = Buffer.concat([Buffer.from(type, "ascii"), data]);
  const crc = Buffer.alloc(4);
  crc.writeUInt32BE(crc32(body));
  return Buffer.concat([len, body, crc]);
}

// Coverage (0..1) of the bag glyph at unit coordinates (u, v) in [0, 1), 4x4 supersampled.
function inBag(u, v) {
  // body: rounded rectangle
  const [x0, x1, y0, y1, r] = [0.27, 0.73, 0.4, 0.76, 0.04];
  const cx = Math.min(Math.max(u, x0 + r), x1 - r);
  const cy = Math.min(Math.max(v, y0 + r), y1 - r);
  if ((u - cx) ** 2 + (v - cy) ** 2 <= r * r) return true;
  // handle: a ring (half above the body)
  const d = Math.hypot(u - 0.5, v - 0.4);
  return v <= 0.4 && d >= 0.1 && d <= 0.145;
}

function png(size) {
  const rows = [];
  const S = 4;
  for (let y = 0; y < size; y++) {
    const row = Buffer.alloc(1 + size * 3); // filter byte 0 + RGB
    for (let x = 0; x < size; x++) {
      let hit = 0;
      for (let sy = 0; sy < S; sy++)
        for (let sx = 0; sx < S; sx++) if (inBag((x + (sx + 0.5) / S) / size, (y + (sy + 0.5) / S) / size)) hit++;
      const a = hit / (S * S);
      for (let c = 0; c < 3; c++) row[1 + x * 3 + c] = Math.round(GREEN[c] * (1 - a) + WHITE[c] * a);
    }
    rows.push(row);
  }
  const ihdr = Buffer.alloc(13);
  ihdr.writeUInt32BE(size, 0);
  ihdr.writeUInt32BE(size, 4);
  ihdr.set([8, 2, 0, 0, 0], 8); // 8-bit, truecolour, deflate, no filter, no interlace
  return Buffer.concat([
    Buffer.from([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a]),
    chunk("IHDR", ihdr),
    chunk("IDAT", deflateSync(Buffer.concat(rows), { level: 9 })),
    chunk("IEND", Buffer.alloc(0)),
  ]);
}

for (const size of [192, 512]) {
  const file = new URL(`../icons/icon-${size}.png`, import.meta.url);
  writeFileSync(file, png(size));
  console.log(`wrote ${file.pathname}`);
}
