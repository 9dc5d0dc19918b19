"""A raw-socket SMTP client for exact bytes: what we send is what goes on the wire."""

from __future__ import annotations

import asyncio


class Wire:
    """One SMTP connection driven line by line."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, port: int, host: str = "127.0.0.1") -> Wire:
        reader, writer = await asyncio.open_connection(host, port, limit=2**20)
        wire = cls(reader, writer)
        return wire

    async def reply(self) -> tuple[int, list[str]]:
        """Read one (possibly multi-line) reply: (code, text lines); 10 s at most per line."""
        lines = []
        while True:
            raw = await asyncio.wait_for(self.reader.readline(), 10)
            if not raw:
                raise ConnectionError("server closed the connection")
            line = raw.decode("utf-8").rstrip("\r\n")
            lines.append(line[4:])
            if line[3:4] != "-":
                return int(line[:3]), lines

    async def cmd(self, line: str | bytes) -> tuple[int, list[str]]:
        """Send one command line (CRLF added) and read its reply."""
        data = line.encode("utf-8") if isinstance(line, str) else line
        self.writer.write(data + b"\r\n")
        await self.writer.drain()
        return await self.reply()

    async def send_raw(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except ConnectionError:
            pass


def stuff(message: bytes) -> bytes:
    """Dot-stuff lines (CRLF-delimited) that begin with '.', and add the CRLF.CRLF end."""
    out = message.replace(b"\r\n.", b"\r\n..")
    if out.startswith(b"."):
        out = b"." + out
    if not out.endswith(b"\r\n"):
        out += b"\r\n"
    return out + b".\r\n"
