#!/usr/bin/env node
// Sends one message through nodemailer's SMTP transport, the way a Node app would.
//
// Usage:
//   node send.js '<json>'      the request as one JSON argument
//   node send.js -             the request as JSON on stdin (large attachments)
//   node send.js PORT [HOST]   a fixed test message to HOST (default 127.0.0.1)
//
// Request: {"port": 2525, "host": "127.0.0.1", "transport": {...}, "message": {...},
//           "transcript": false}
// "transport" overrides the SMTP transport options below; "tls.caFile" is read
// into "tls.ca" (so "secure", "requireTLS", "auth" and "localAddress" work as in an
// app). "message" is passed to sendMail() unchanged (from, to, subject, text, html,
// attachments, headers such as Idempotency-Key, messageId, ...). With "transcript",
// the SMTP dialog as nodemailer logs it (credentials masked by nodemailer) and
// whether the socket was encrypted come back in the result.
//
// Prints one JSON line: {"ok": true, "messageId", "response", ...} on success,
// or {"ok": false, "error": {...}} with exit status 1 when the send fails.
'use strict';

const fs = require('fs');
const nodemailer = require('nodemailer');

function readRequest(argv) {
    if (argv.length === 0) {
        throw new Error('usage: send.js <json> | - | PORT [HOST]');
    }
    if (argv[0] === '-') {
        return JSON.parse(fs.readFileSync(0, 'utf8'));
    }
    if (/^\d+$/.test(argv[0])) {
        return {
            port: Number(argv[0]),
            host: argv[1] || '127.0.0.1',
            message: {
                from: 'sender@example.com',
                to: 'recipient@example.com',
                subject: 'nodemailer test message',
                text: 'Hello from nodemailer.'
            }
        };
    }
    return JSON.parse(argv[0]);
}

function transportOptions(request) {
    const options = {
        host: request.host || '127.0.0.1',
        port: request.port,
        secure: false,
        ignoreTLS: true,
        name: 'nodemailer.localdomain',
        connectionTimeout: 10000,
        greetingTimeout: 10000,
        socketTimeout: 30000,
        ...(request.transport || {})
    };
    if (options.tls && options.tls.caFile) {
        const { caFile, ...tls } = options.tls;
        options.tls = { ...tls, ca: fs.readFileSync(caFile) };
    }
    return options;
}

function errorInfo(err) {
    return {
        message: String(err && err.message),
        code: err && err.code,
        command: err && err.command,
        response: err && err.response,
        responseCode: err && err.responseCode
    };
}

// A bunyan-style logger that keeps nodemailer's SMTP transcript lines.
function transcriptLogger(lines) {
    const keep = (entry, message, ...args) => {
        let text = String(message);
        for (const arg of args) {
            text = text.replace(/%[sdj]/, String(arg));
        }
        lines.push(text);
    };
    const logger = {};
    for (const level of ['trace', 'debug', 'info', 'warn', 'error', 'fatal']) {
        logger[level] = keep;
    }
    return logger;
}

async function main() {
    let request;
    try {
        request = readRequest(process.argv.slice(2));
    } catch (err) {
        process.stdout.write(JSON.stringify({ ok: false, error: errorInfo(err) }) + '\n');
        return 2;
    }
    const options = transportOptions(request);
    const transcript = [];
    if (request.transcript) {
        options.logger = transcriptLogger(transcript);
        options.debug = true;
    }
    const transporter = nodemailer.createTransport(options);
    const extra = request.transcript ? { transcript } : {};
    try {
        const info = await transporter.sendMail(request.message || {});
        process.stdout.write(JSON.stringify({ ok: true, ...info, ...extra }) + '\n');
        return 0;
    } catch (err) {
        process.stdout.write(JSON.stringify({ ok: false, error: errorInfo(err), ...extra }) + '\n');
        return 1;
    } finally {
        transporter.close();
    }
}

main().then((code) => {
    process.exitCode = code;
});
