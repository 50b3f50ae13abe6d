using System.Collections.Concurrent;
using OffloadRpc.Tests.Infrastructure;
using OffloadRpc.Transport;
using Xunit;

namespace OffloadRpc.Tests;

/// <summary>
/// A peer process that writes corrupt slots, offsets, ids, releases or segments: the connection closes
/// with <see cref="ProtocolViolationException"/>, this process does not crash, and other clients go on.
/// </summary>
public sealed class ProtocolViolationTests
{
    [Theory]
    [InlineData("corrupt-seq", "corrupted message ring slot")]
    [InlineData("corrupt-offset", "outside its 67108864-byte segment 1")]
    [InlineData("overlong-payload", "a payload of 68719476736 bytes")]
    [InlineData("unknown-segment", "segment 77, which it never handed over")]
    [InlineData("body-length", "a body of 100000 bytes")]
    [InlineData("payload-count", "17 payload references")]
    [InlineData("bad-kind", "message kind 99")]
    [InlineData("stray-response", "not waiting for one")]
    [InlineData("bad-release", "released block 1:0, which was not lent")]
    [InlineData("unsealed-segment", "segment 50 that is not sealed against resizing")]
    [InlineData("shrinkable-segment", "segment 50 that is not sealed against resizing")]
    [InlineData("missized-segment", "segment 50 of 1048576 bytes but announced 2097152")]
    [InlineData("pipelined-overrun", "pipelined payload's progress")]
    [InlineData("ring-overrun", "a streamed payload's progress went from 0 to 8192 (taken 0, ring 1024, end -1)")]
    [InlineData("ring-end-mismatch", "a streamed payload's progress went from 0 to 512 (taken 0, ring 1024, end 8192)")]
    [InlineData("ring-past-announced", "a streamed payload's progress went from 0 to 768 (taken 0, ring 1024, end -1, announced 512)")]
    [InlineData("ring-negative-announced", "a streamed payload announced a length of -7 bytes")]
    [InlineData("bad-metadata-length", "a metadata block longer than its 5-byte body")]
    public async Task A_malicious_client_is_disconnected_with_ProtocolViolationException_and_others_are_unaffected(string kind, string cause)
    {
        var failures = new ConcurrentQueue<Exception>();
        await using var server = new InProcessServer(failures);
        await using RpcConnection good = await server.ConnectAsync();

        await using PeerProcess evil = PeerProcess.Start(["evil-client", server.Endpoint, kind]);
        evil.WaitForLine("SENT");
        string closed = evil.WaitForLine("CLOSED");
        Assert.Contains("PeerDisconnectedException", closed); // the server hung up on it

        await Eventually.TrueAsync(() => !failures.IsEmpty, "the server reports the violation");
        ProtocolViolationException violation = Assert.IsType<ProtocolViolationException>(Assert.Single(failures));
        Assert.Contains(cause, violation.Message);

        using RpcReply reply = await good.CallAsync(1, "still here"u8, default);
        Assert.True(reply.Body.SequenceEqual("still here"u8));
        Assert.Single(server.Listener.Connections);
    }

    [Fact]
    public async Task A_client_that_stops_writing_a_pipelined_payload_is_disconnected_after_the_stall_timeout()
    {
        var failures = new ConcurrentQueue<Exception>();
        await using var server = new InProcessServer(failures, new TransportOptions { ArenaWaitTimeout = TimeSpan.FromSeconds(1) });
        await using RpcConnection good = await server.ConnectAsync();

        // The evil process stays alive (no hang-up to notice): only the missing progress can end the wait.
        await using PeerProcess evil = PeerProcess.Start(["evil-client", server.Endpoint, "pipelined-stall"]);
        evil.WaitForLine("SENT");
        string closed = evil.WaitForLine("CLOSED");
        Assert.Contains("PeerDisconnectedException", closed);

        await Eventually.TrueAsync(() => !failures.IsEmpty, "the server reports the stall");
        ProtocolViolationException violation = Assert.IsType<ProtocolViolationException>(Assert.Single(failures));
        Assert.Contains("stalled at 4096 of 32768 bytes", violation.Message);

        using RpcReply reply = await good.CallAsync(1, "still here"u8, default);
        Assert.True(reply.Body.SequenceEqual("still here"u8));
    }

    [Fact]
    public async Task A_server_that_claims_more_of_a_streamed_argument_than_was_written_is_a_protocol_violation()
    {
        string endpoint = Endpoints.Unique("evil-server");
        await using PeerProcess evil = PeerProcess.Start(["evil-server", endpoint, "ring-overclaim"]);
        evil.WaitForLine("READY");
        try
        {
            await using RpcConnection connection = await Handshake.ConnectAsync(endpoint, new TransportOptions(), [], null, CancellationToken.None);

            // Longer than the ring, so the client waits for room and reads the forged count.
            var source = new StreamSource(new UnseekableStream(new byte[16 << 20]), -1, CancellationToken.None);
            Task<RpcReply> call = connection.CallAsync(1, "hi"u8, [OutboundPayload.FromStream(source, CachePolicy.Auto)]).AsTask();
            ProtocolViolationException pumped = await Assert.ThrowsAsync<ProtocolViolationException>(() => source.Completion.WaitAsync(TimeSpan.FromSeconds(30)));
            Assert.Contains("it reported taking 1099511627776 bytes of a streamed argument", pumped.Message);
            await Assert.ThrowsAsync<ProtocolViolationException>(() => call.WaitAsync(TimeSpan.FromSeconds(30)));
            Assert.IsType<ProtocolViolationException>(connection.TerminalException);
        }
        finally
        {
            Endpoints.RemoveStale(endpoint);
        }
    }

    [Fact]
    public async Task A_stream_argument_that_goes_quiet_fails_its_call_alone_after_the_stall_timeout()
    {
        var failures = new ConcurrentQueue<Exception>();
        await using var server = new InProcessServer(failures, new TransportOptions { ArenaWaitTimeout = TimeSpan.FromSeconds(1) });

        // A pipe that sends 1 KiB and then nothing: not the peer's fault, so not a protocol violation.
        await using PeerProcess client = PeerProcess.Start(["client-idle-stream", server.Endpoint]);
        string call = client.WaitForLine("CALL");
        Assert.Contains("RemoteInvocationException System.TimeoutException", call);
        Assert.Contains("sent no bytes for 1 s (after 1024 bytes)", call);
        client.WaitForLine("SECOND OK"); // the same connection serves the next call
        Assert.Empty(failures);
    }

    [Theory]
    [InlineData("bad-offset-response")]
    [InlineData("corrupt-seq-response")]
    [InlineData("wrong-call-response")]
    [InlineData("malformed-fault")]
    [InlineData("duplicate-response")]
    public async Task A_malicious_server_fails_the_call_with_ProtocolViolationException(string kind)
    {
        string endpoint = Endpoints.Unique("evil-server");
        await using PeerProcess evil = PeerProcess.Start(["evil-server", endpoint, kind]);
        evil.WaitForLine("READY");
        try
        {
            await using RpcConnection connection = await Handshake.ConnectAsync(endpoint, new TransportOptions(), [], null, CancellationToken.None);
            if (kind == "duplicate-response")
            {
                // The first answer completes the call; the second one is the violation.
                using (RpcReply first = await connection.CallAsync(1, "hi"u8, default))
                {
                }

                await connection.Completion.WaitAsync(TimeSpan.FromSeconds(30));
                Assert.IsType<ProtocolViolationException>(connection.TerminalException);
            }
            else
            {
                await Assert.ThrowsAsync<ProtocolViolationException>(async () => await connection.CallAsync(1, "hi"u8, [OutboundPayload.Copy(new byte[100])]).AsTask().WaitAsync(TimeSpan.FromSeconds(30)));
            }

            await Assert.ThrowsAsync<ProtocolViolationException>(async () => await connection.CallAsync(1, "again"u8, default));
        }
        finally
        {
            Endpoints.RemoveStale(endpoint);
        }
    }
}

/// <summary>A stream that cannot seek, as a pipe or a socket: sent through a ring whose length is unknown up front.</summary>
internal sealed class UnseekableStream(byte[] data) : MemoryStream(data, writable: false)
{
    public override bool CanSeek => false;
}

/// <summary>A listener in this process with an echo handler, reporting refused and failed connections.</summary>
internal sealed class InProcessServer : IAsyncDisposable, IRequestHandler
{
    public InProcessServer(ConcurrentQueue<Exception> failures, TransportOptions? options = null, string? endpoint = null, IReadOnlyDictionary<string, ulong>? contracts = null, IRequestHandler? handler = null)
    {
        Endpoint = endpoint ?? Endpoints.Unique("inproc");
        Listener = new RpcListener(Endpoint, options ?? new TransportOptions(), contracts?.Select(c => new ContractDescriptor(c.Key, c.Value)).ToArray() ?? [], _ => handler ?? this);
        Listener.ConnectionFailed += failures.Enqueue;
        Listener.Start();
    }

    public string Endpoint { get; }

    public RpcListener Listener { get; }

    public Task<RpcConnection> ConnectAsync(TransportOptions? options = null, IReadOnlyList<ContractDescriptor>? contracts = null) =>
        Handshake.ConnectAsync(Endpoint, options ?? new TransportOptions(), contracts ?? [], null, CancellationToken.None);

    public ValueTask HandleAsync(IncomingCall call)
    {
        for (int i = 0; i < call.PayloadCount; i++)
        {
            // Read to its end: a pipelined payload is followed as it lands, a streamed one through its ring.
            using Stream payload = call.OpenPayloadStream(i);
            payload.CopyTo(Stream.Null);
        }

        call.Reply(call.Body);
        return ValueTask.CompletedTask;
    }

    public ValueTask DisposeAsync() => Listener.DisposeAsync();
}
