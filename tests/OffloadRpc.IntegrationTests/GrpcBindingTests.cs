using Grpc.AspNetCore.Server;
using Grpc.Core;
using Microsoft.AspNetCore.Builder;
using Microsoft.AspNetCore.Routing;
using Microsoft.Extensions.DependencyInjection;
using OffloadRpc.Grpc.Internal;
using OffloadRpc.Internal;
using OffloadRpc.Testing;
using OffloadRpc.Transport;
using OffloadRpc.TestContracts;
using OffloadRpc.Tests.Infrastructure;
using Xunit;

namespace OffloadRpc.Tests;

/// <summary>
/// How the gRPC transport binds a contract's methods (the calls themselves are tested across two
/// processes in <see cref="GrpcTransportTests"/>): each method as the least streaming its shape needs.
/// </summary>
public sealed class GrpcBindingTests
{
    private const string Images = "/OffloadRpc.TestContracts.IImageService/";

    [Fact]
    public async Task The_server_binds_each_method_as_the_least_streaming_its_shape_needs()
    {
        string endpoint = Endpoints.Unique("binding");
        WebApplicationBuilder builder = WebApplication.CreateSlimBuilder();
        builder.Services.AddOffloadRpcServer(endpoint).AddService<IImageService, ImageService>(ServiceLifetime.Singleton);
        await using WebApplication app = builder.Build();
        app.MapOffloadRpcGrpc();

        Dictionary<string, MethodType> bound = ((IEndpointRouteBuilder)app).DataSources
            .SelectMany(source => source.Endpoints)
            .Select(e => e.Metadata.GetMetadata<GrpcMethodMetadata>()?.Method)
            .OfType<IMethod>()
            .DistinctBy(m => m.FullName)
            .ToDictionary(m => m.FullName, m => m.Type);

        Assert.Equal(MethodType.Unary, bound[Images + "AddAsync"]); // MessagePack only, each way
        Assert.Equal(MethodType.ClientStreaming, bound[Images + "ChecksumAsync"]); // a buffer in, a plain result out
        Assert.Equal(MethodType.ClientStreaming, bound[Images + "DetectAsync"]);
        Assert.Equal(MethodType.ClientStreaming, bound[Images + "ProcessAsync"]);
        Assert.Equal(MethodType.ServerStreaming, bound[Images + "RenderAsync"]); // a buffer out
        Assert.Equal(MethodType.DuplexStreaming, bound[Images + "EchoAsync"]); // buffers both ways
        Assert.Equal(MethodType.Unary, bound["/offloadrpc.Server/Describe"]);
        Endpoints.RemoveStale(endpoint);
    }

    [Fact]
    public void A_method_of_unknown_shape_is_duplex_and_never_called_as_unary()
    {
        var described = new MethodDescriptor("Svc", "Plain", 1) { Shape = MethodShape.Described };
        var unknown = new MethodDescriptor("Svc", "Old", 2); // generated before methods had a shape

        Assert.Equal(MethodType.Unary, GrpcWire.BindingOf(described));
        Assert.True(new GrpcMethod(described).OneFrameReply);
        Assert.Equal(MethodType.DuplexStreaming, GrpcWire.BindingOf(unknown));
        Assert.False(new GrpcMethod(unknown).OneFrameReply);
        Assert.Equal(MethodType.DuplexStreaming, GrpcWire.BindingOf(new MethodDescriptor("Svc", "Items", 3) { Shape = MethodShape.Described | MethodShape.StreamedArgument }));
        Assert.Equal(MethodType.ServerStreaming, GrpcWire.BindingOf(new MethodDescriptor("Svc", "Stream", 4) { Shape = MethodShape.Described | MethodShape.StreamedResult }));
        Assert.Equal("/Svc/Old", new GrpcMethod(unknown).Unary.FullName); // the same path, whatever the call
    }

    [Fact]
    public void A_served_calls_token_asked_for_after_the_call_ended_is_cancelled_and_links_to_nothing()
    {
        // Asked for during the call, then again after it: the source made during the call is disposed with
        // it, and asking again neither throws nor makes another.
        using var aborted = new CancellationTokenSource();
        var context = new FakeServerCallContext(aborted.Token);
        var call = new GrpcInboundCall(1, new MessageAssembler(1024), context, default, null, null, 4, 1024);
        Assert.False(call.CancellationToken.IsCancellationRequested); // made on first use, linked to the request's
        call.Dispose();
        Assert.True(call.CancellationToken.IsCancellationRequested);
        call.CancelAfter(TimeSpan.FromMilliseconds(1)); // harmless once ended
        call.Dispose();

        // Asked for only after the call ended (a writer failing late, a context kept past the call): the
        // request's token (which Kestrel reuses for later requests) is not even read.
        var late = new FakeServerCallContext(aborted.Token);
        var ended = new GrpcInboundCall(2, new MessageAssembler(1024), late, default, null, null, 4, 1024);
        ended.Dispose();
        Assert.True(ended.CancellationToken.IsCancellationRequested);
        Assert.Equal(0, late.TokenReads);
    }

    [Fact]
    public async Task A_served_calls_token_asked_for_while_the_call_is_disposed_is_a_token_not_an_exception()
    {
        // The first read of the token makes a linked source; Dispose, at the same moment, disposes it. Whichever
        // wins, the reader gets a token (the call's, or the ended call's cancelled one), never ObjectDisposedException.
        using var aborted = new CancellationTokenSource();
        var context = new FakeServerCallContext(aborted.Token);
        var clock = System.Diagnostics.Stopwatch.StartNew();
        while (clock.Elapsed < TimeSpan.FromSeconds(2)) // bounded; the race is narrow, so as many tries as fit
        {
            var call = new GrpcInboundCall(1, new MessageAssembler(1024), context, default, null, null, 4, 1024);
            using var start = new Barrier(2);
            Task<CancellationToken> read = Task.Run(() =>
            {
                start.SignalAndWait();
                return call.CancellationToken;
            });
            Task dispose = Task.Run(() =>
            {
                start.SignalAndWait();
                call.Dispose();
                call.CancelAfter(TimeSpan.FromMilliseconds(1)); // harmless once ended
            });
            await Task.WhenAll(read, dispose);
        }
    }

    [Theory]
    [InlineData(0, new int[0])]
    [InlineData(7, new[] { 3 })]
    [InlineData(300, new[] { 0, 1, 4096, 60_000 })] // 64,097 bytes: still one frame
    public void A_one_frame_message_written_as_its_head_alone_is_the_frame_the_whole_message_gives(int bodyBytes, int[] payloadBytes)
    {
        var random = new Random(bodyBytes + payloadBytes.Length);
        byte[] body = new byte[bodyBytes];
        random.NextBytes(body);
        byte[][] payloads = [.. payloadBytes.Select(n => { byte[] b = new byte[n]; random.NextBytes(b); return b; })];

        // Each payload once as the caller's memory, once as a lease: a lease's bytes are copied in and the lease given back.
        SharedBuffer[] leases = [.. payloads.Select(p => { SharedBuffer lease = LocalLeases.Instance.Rent(p.Length); p.CopyTo(lease.Span); return lease; })];
        OutboundPayload[] copied = [.. payloads.Select(p => OutboundPayload.Copy(p))];
        OutboundPayload[] moved = [.. leases.Select(OutboundPayload.Move)];
        Assert.True(OutgoingMessage.IsInline(copied));

        // The wire layout, written out here: [u32 body length][body][u16 payload count][i64 length each][payload bytes].
        var expected = new List<byte>();
        expected.AddRange(BitConverter.GetBytes((uint)body.Length));
        expected.AddRange(body);
        expected.AddRange(BitConverter.GetBytes((ushort)payloads.Length));
        foreach (byte[] payload in payloads)
        {
            expected.AddRange(BitConverter.GetBytes((long)payload.Length));
        }

        foreach (byte[] payload in payloads)
        {
            expected.AddRange(payload);
        }

        using OutgoingMessage message = OutgoingMessage.Create(body, copied);
        Assert.True(message.IsSingleFrame);
        Assert.Equal(expected, message.Head.First.ToArray());
        Frame head = OutgoingMessage.HeadFrame(body, moved, releaseAfterWrite: false);
        Assert.Equal(FrameKind.Head, head.Kind);
        Assert.Equal(expected, head.First.ToArray());
        Assert.All(leases, lease => Assert.True(lease.IsGone));

        // And read back as a reply: the body and every payload as sent.
        var assembler = new MessageAssembler(1 << 20);
        Assert.True(assembler.Accept(head));
        RpcReply reply = assembler.ToReply(new NoPeer());
        Assert.Equal(body, reply.Body.ToArray());
        Assert.Equal(payloads.Length, reply.PayloadCount);
        for (int i = 0; i < payloads.Length; i++)
        {
            using SharedBuffer payload = reply.TakePayload(i);
            Assert.Equal(payloads[i], payload.Span.ToArray());
        }

        reply.Dispose();
    }

    [Fact]
    public void A_message_that_cannot_be_made_gives_back_the_leases_it_was_handed()
    {
        // The first lease is already gone when the head is written: the copy fails, and the lease after it,
        // which the message had taken over too, goes back instead of leaking.
        SharedBuffer gone = LocalLeases.Instance.Rent(8);
        SharedBuffer after = LocalLeases.Instance.Rent(8);
        gone.Dispose();
        Assert.Throws<ObjectDisposedException>(() => OutgoingMessage.HeadFrame([0x90], [OutboundPayload.Move(gone), OutboundPayload.Move(after)], releaseAfterWrite: false));
        Assert.True(after.IsGone);
    }

    [Fact]
    public void A_reply_disposed_as_a_message_is_gone_as_a_reply_too()
    {
        var assembler = new MessageAssembler(1 << 20);
        Assert.True(assembler.Accept(OutgoingMessage.HeadFrame([0x90], [OutboundPayload.Copy(new byte[] { 1, 2 })], releaseAfterWrite: false)));
        RpcReply reply = assembler.ToReply(new NoPeer());
        SharedBuffer lent = reply.LendPayload(0);
        assembler.Dispose(); // the way an error path ends it
        Assert.True(lent.IsGone);
        Assert.Throws<ObjectDisposedException>(() => reply.PayloadCount);
        reply.Dispose();
    }

    [Fact]
    public void A_reply_read_from_its_assembler_refuses_a_payload_twice_and_is_gone_once_disposed()
    {
        byte[] data = [1, 2, 3, 4, 5];
        var assembler = new MessageAssembler(1 << 20);
        Assert.True(assembler.Accept(OutgoingMessage.HeadFrame([0x90], [OutboundPayload.Copy(data), OutboundPayload.Copy(data)], releaseAfterWrite: false)));
        var peer = new NoPeer();
        RpcReply reply = assembler.ToReply(peer);

        SharedBuffer taken = reply.TakePayload(0);
        Assert.Throws<ProtocolViolationException>(() => reply.TakePayload(0));
        SharedBuffer lent = reply.LendPayload(1); // lent: given back with the reply
        Assert.Equal(data, lent.Span.ToArray());
        reply.AbortConnection(new ProtocolViolationException("test"));
        Assert.Equal(1, peer.Aborted);

        reply.Dispose();
        Assert.True(lent.IsGone);
        Assert.False(taken.IsGone); // the caller's, until it disposes it
        Assert.Throws<ObjectDisposedException>(() => reply.Body.Length);
        taken.Dispose();
    }

    [Fact]
    public void A_unary_bound_calls_reply_of_one_frame_is_taken_as_that_frame_and_a_larger_one_as_a_message()
    {
        var context = new FakeServerCallContext(CancellationToken.None);

        // One frame: the frame alone (gRPC writes it after the method returned), the message path empty.
        var call = new GrpcInboundCall(1, new MessageAssembler(1024), context, default, null, null, 4, 1024);
        call.Reply([0x2A], [OutboundPayload.Copy(new byte[] { 9, 8, 7 })]);
        Assert.Throws<InvalidOperationException>(() => call.Reply([0x2A], default));
        Frame? head = call.TakeReplyHead();
        Assert.NotNull(head);
        Assert.Same(OutgoingMessage.EmptyReply, call.TakeReply());
        var assembler = new MessageAssembler(1024);
        Assert.True(assembler.Accept(head));
        Assert.Equal(new byte[] { 0x2A }, assembler.Body.ToArray());
        assembler.Dispose();
        call.Dispose();

        // A reply made but never taken (the call failed after it) is given back with the call.
        var unanswered = new GrpcInboundCall(2, new MessageAssembler(1024), context, default, null, null, 4, 1024);
        unanswered.Reply([0x2A], default);
        Frame made = unanswered.PendingReplyHead!;
        unanswered.Dispose();
        Assert.True(made.IsReleased);
        Assert.Null(unanswered.TakeReplyHead());

        // Buffers beyond one frame: a message, which the route refuses for a method bound with one response message.
        var large = new GrpcInboundCall(3, new MessageAssembler(1024), context, default, null, null, 4, 1024);
        large.Reply([0x2A], [OutboundPayload.Copy(new byte[Frame.InlineBytes + 1])]);
        Assert.Null(large.TakeReplyHead());
        using (OutgoingMessage message = large.TakeReply())
        {
            Assert.False(message.IsSingleFrame);
        }

        large.Dispose();
    }

    private sealed class NoPeer : IGrpcPeer
    {
        public int Aborted { get; private set; }

        public void AbortConnection(ProtocolViolationException violation) => Aborted++;
    }

    /// <summary>Just the parts of a gRPC server call a <see cref="GrpcInboundCall"/> reads.</summary>
    private sealed class FakeServerCallContext(CancellationToken aborted) : ServerCallContext
    {
        public int TokenReads { get; private set; }

        protected override string MethodCore => "/Svc/M";

        protected override string HostCore => "localhost";

        protected override string PeerCore => "unix:";

        protected override DateTime DeadlineCore => DateTime.MaxValue;

        protected override Metadata RequestHeadersCore => [];

        protected override CancellationToken CancellationTokenCore
        {
            get
            {
                TokenReads++;
                return aborted;
            }
        }

        protected override Metadata ResponseTrailersCore => [];

        protected override Status StatusCore { get; set; }

        protected override WriteOptions? WriteOptionsCore { get; set; }

        protected override AuthContext AuthContextCore => new(null, []);

        protected override ContextPropagationToken CreatePropagationTokenCore(ContextPropagationOptions? options) => throw new NotSupportedException();

        protected override Task WriteResponseHeadersAsyncCore(Metadata responseHeaders) => Task.CompletedTask;
    }

    /// <summary>Bound, never called here.</summary>
    private sealed class ImageService : IImageService
    {
        public ValueTask<int> AddAsync(int a, int b, CancellationToken ct = default) => ValueTask.FromResult(a + b);

        public ValueTask<ulong> ChecksumAsync(ReadOnlyMemory<byte> frame, CancellationToken ct = default) => ValueTask.FromResult(Checksum64.Compute(frame.Span));

        public ValueTask<byte[]> EchoAsync(byte[] data, CancellationToken ct = default) => ValueTask.FromResult(data);

        public ValueTask<Detection[]> DetectAsync(ReadOnlyMemory<byte> batch, DetectOptions options, CancellationToken ct = default) => ValueTask.FromResult(Array.Empty<Detection>());

        public ValueTask<SharedBuffer> RenderAsync(int width, int height, CancellationToken ct = default) => ValueTask.FromResult(OffloadCallContext.Current!.Rent(width * height));

        public ValueTask ProcessAsync(SharedBuffer frame, CancellationToken ct = default)
        {
            frame.Dispose();
            return ValueTask.CompletedTask;
        }
    }
}
