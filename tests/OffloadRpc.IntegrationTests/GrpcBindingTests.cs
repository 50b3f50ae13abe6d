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
    public void The_client_side_ships_without_ASP_NET_Core()
    {
        // A client-only application references OffloadRpc.Grpc.Client and runs on the .NET runtime alone:
        // the client's code and every assembly it references stay out of the ASP.NET Core framework.
        System.Reflection.Assembly client = typeof(OffloadRpc.Grpc.OffloadRpcGrpcOptionsExtensions).Assembly;
        Assert.Equal("OffloadRpc.Grpc.Client", client.GetName().Name);
        Assert.Same(client, typeof(GrpcInvoker).Assembly);
        Assert.DoesNotContain(client.GetReferencedAssemblies(), name => name.Name!.StartsWith("Microsoft.AspNetCore", StringComparison.Ordinal) || name.Name == "OffloadRpc.Hosting");

        // The server's side is the other assembly, which brings the client with it.
        System.Reflection.Assembly server = typeof(GrpcServiceBinder).Assembly;
        Assert.Equal("OffloadRpc.Grpc", server.GetName().Name);
        Assert.Contains(server.GetReferencedAssemblies(), name => name.Name == "OffloadRpc.Grpc.Client");
    }

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
    public async Task A_streamed_result_and_the_credit_of_a_streamed_argument_begun_at_once_share_one_writer()
    {
        // A duplex method may consume its streamed argument on one thread while its result is produced on
        // another: the first credit and the first item then start the response writer at the same moment.
        // gRPC takes one write at a time, so there must be one writer, and nothing queued may be lost.
        for (int round = 0; round < 300; round++)
        {
            var responses = new OneWriteAtATime();
            var call = new GrpcInboundCall(1, new MessageAssembler(1024), new FakeServerCallContext(CancellationToken.None), default, null, responses, 4, 1024);
            using var start = new Barrier(2);
            Task credit = Task.Run(() =>
            {
                start.SignalAndWait();
                call.SendCredit(3);
            });
            Task item = Task.Run(() =>
            {
                start.SignalAndWait();
                call.SendStreamItem([0x90], [], CancellationToken.None);
            });
            await Task.WhenAll(credit, item).WaitAsync(TimeSpan.FromSeconds(30));
            await call.FinishItemsAsync().WaitAsync(TimeSpan.FromSeconds(30));
            Assert.False(responses.Overlapped, $"two writes at once in round {round}");
            Assert.Equal([FrameKind.ItemHead, FrameKind.Credit], responses.Written.Order()); // both written, in whichever order they came
            call.Dispose();
        }
    }

    /// <summary>A response stream that notes its writes and whether one began before the last ended (gRPC's own throws then).</summary>
    private sealed class OneWriteAtATime : IServerStreamWriter<Frame>
    {
        private int _writing;

        public List<FrameKind> Written { get; } = [];

        public bool Overlapped { get; private set; }

        public WriteOptions? WriteOptions { get; set; }

        public Task WriteAsync(Frame message) => WriteAsync(message, CancellationToken.None);

        public async Task WriteAsync(Frame message, CancellationToken cancellationToken)
        {
            if (Interlocked.Exchange(ref _writing, 1) != 0)
            {
                Overlapped = true;
            }

            await Task.Delay(1, cancellationToken);
            lock (Written)
            {
                Written.Add(message.Kind);
            }

            Volatile.Write(ref _writing, 0);
        }
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

        byte[] expected = HeadBytes(body, payloads);
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
    public void A_reply_whose_result_is_an_array_is_read_into_that_array_and_decoded_as_it_is()
    {
        float[] sent = [.. Enumerable.Range(0, 400_000).Select(i => i * 0.5f)]; // 1.6 MB: a head, then data frames
        byte[] bytes = System.Runtime.InteropServices.MemoryMarshal.AsBytes(sent.AsSpan()).ToArray();
        var budget = new LeaseBudget(4 << 20, forReplies: true);
        var assembler = new MessageAssembler(1 << 20, budget);
        assembler.ReceiveArray(ArrayReceiver.For<float[]>());
        Assert.False(assembler.Accept(new Frame(FrameKind.Head, ReplyHead([0x00], bytes.Length)))); // body: MessagePack 0, the payload's index
        Assert.False(assembler.Accept(new Frame(FrameKind.Data, bytes.AsMemory(0, 1000).ToArray())));
        assembler.ReceiveArray(ArrayReceiver.For<int[]>()); // too late: the head decided
        Assert.Equal(bytes.Length, budget.HeldBytes); // the array counts as a lease would, at its bytes
        Assert.True(assembler.TryFill(new System.Buffers.ReadOnlySequence<byte>(bytes.AsMemory(1000, 1 << 20)))); // the deserializer's way, in place
        Assert.True(assembler.Accept(new Frame(FrameKind.Data, bytes.AsMemory(1000 + (1 << 20)).ToArray())));

        RpcReply reply = assembler.ToReply(new NoPeer());
        var decoded = new CallReply(reply, new OffloadRpcOptions().CreateSerializerOptions());
        Assert.False(reply.TryTakeArray(0, out int[]? _)); // an array of another type is not it
        float[]? result = decoded.CopyArray<float>(0);
        Assert.Equal(sent, result);
        Assert.Equal(0, budget.HeldBytes); // the caller's memory from here
        Assert.Throws<ProtocolViolationException>(() => decoded.CopyArray<float>(0)); // named twice
        reply.Dispose();
        Assert.Equal(sent, result); // not a view of anything the reply gave back
    }

    [Fact]
    public void A_reply_that_cannot_be_its_result_s_array_keeps_its_leases_and_decodes_as_before()
    {
        var options = new OffloadRpcOptions().CreateSerializerOptions();

        // Ten bytes are no whole number of floats: received into a lease, and refused when decoded; the
        // budget the array would have taken is back, and the lease's goes back with the reply.
        var budget = new LeaseBudget(1 << 20, forReplies: true);
        var odd = new MessageAssembler(1 << 20, budget);
        odd.ReceiveArray(ArrayReceiver.For<float[]>());
        Assert.True(odd.Accept(new Frame(FrameKind.Head, ReplyHead([0x00], 10, new byte[10]))));
        Assert.Equal(4096, budget.HeldBytes); // a lease of one page, not an array of ten bytes
        RpcReply oddReply = odd.ToReply(new NoPeer());
        Assert.Throws<ProtocolViolationException>(() => new CallReply(oddReply, options).CopyArray<float>(0));
        oddReply.Dispose();
        Assert.Equal(0, budget.HeldBytes);

        // An array the process cannot allocate is no room, and takes nothing of the budget.
        var noMemory = new MessageAssembler(1 << 20, budget);
        noMemory.ReceiveArray(new NoMemoryReceiver());
        ArenaExhaustedException full = Assert.Throws<ArenaExhaustedException>(() => noMemory.Accept(new Frame(FrameKind.Head, ReplyHead([0x00], 3, [1, 2, 3]))));
        Assert.Contains("no room for a buffer of 3 bytes", full.Message, StringComparison.Ordinal);
        noMemory.Dispose();
        Assert.Equal(0, budget.HeldBytes);

        // A large MessagePack reply (a head above 64 KiB) is bounded by MaxMessageBytes, not by the reply budget.
        Frame head = OutgoingMessage.HeadFrame(new byte[100_000], [], releaseAfterWrite: false); // in a pooled buffer of 128 KiB
        Assert.True(head.IsChargeable);
        var tight = new LeaseBudget(1024, forReplies: true);
        var bigHead = new MessageAssembler(1 << 20, tight);
        Assert.True(bigHead.Accept(head));
        Assert.Equal(0, tight.HeldBytes);
        bigHead.Dispose();

        // Two payloads: neither is the result's array.
        var two = new MessageAssembler(1 << 20);
        two.ReceiveArray(ArrayReceiver.For<byte[]>());
        Assert.True(two.Accept(OutgoingMessage.HeadFrame([0x01], [OutboundPayload.Copy(new byte[] { 1, 2 }), OutboundPayload.Copy(new byte[] { 3 })], releaseAfterWrite: false)));
        RpcReply twoReply = two.ToReply(new NoPeer());
        Assert.False(twoReply.TryTakeArray(0, out byte[]? _));
        Assert.Equal(new byte[] { 3 }, new CallReply(twoReply, options).CopyArray<byte>(1));
        twoReply.Dispose();

        // A decoder that asks for the payload as a lease gets its bytes all the same (copied out of the array).
        var asLease = new MessageAssembler(1 << 20);
        asLease.ReceiveArray(ArrayReceiver.For<byte[]>());
        Assert.True(asLease.Accept(new Frame(FrameKind.Head, ReplyHead([0x00], 3, [7, 8, 9]))));
        RpcReply leaseReply = asLease.ToReply(new NoPeer());
        using (SharedBuffer lease = leaseReply.TakePayload(0))
        {
            Assert.Equal(new byte[] { 7, 8, 9 }, lease.Span.ToArray());
        }

        Assert.False(leaseReply.TryTakeArray(0, out byte[]? _));
        leaseReply.Dispose();

        // Not an array of a primitive type: no receiver at all.
        Assert.Null(ArrayReceiver.For<string[]>());
        Assert.Null(ArrayReceiver.For<DetectOptions[]>());
        Assert.NotNull(ArrayReceiver.For<double[]>());
    }

    [Fact]
    public void A_request_whose_one_buffer_argument_is_an_array_is_read_into_that_array_and_handed_to_the_method_as_it_is()
    {
        // What the generator sets and the route asks for: an array of a primitive type only.
        Assert.NotNull(new MethodDescriptor("Svc", "M", 1) { ArrayArgument = typeof(double[]) }.ArgumentArray);
        Assert.Null(new MethodDescriptor("Svc", "M", 1) { ArrayArgument = typeof(string[]) }.ArgumentArray);
        Assert.Null(new MethodDescriptor("Svc", "M", 1) { ArrayArgument = typeof(DetectOptions[]) }.ArgumentArray);
        Assert.Null(new MethodDescriptor("Svc", "M", 1).ArgumentArray);

        double[] sent = [.. Enumerable.Range(0, 200_000).Select(i => i * 0.25)]; // 1.6 MB: a head, then data frames
        byte[] bytes = System.Runtime.InteropServices.MemoryMarshal.AsBytes(sent.AsSpan()).ToArray();
        var budget = new LeaseBudget(4 << 20); // a server's requests
        var assembler = new MessageAssembler(1 << 20, budget);
        var receiver = new RecordingReceiver();
        assembler.ReceiveArray(receiver);
        Assert.False(assembler.Accept(new Frame(FrameKind.Head, ReplyHead([0x91, 0x00], bytes.Length)))); // body: [0], the argument's payload index
        Assert.True(assembler.TryFill(new System.Buffers.ReadOnlySequence<byte>(bytes.AsMemory(0, 1 << 20)))); // in place, as the deserializer does
        Assert.True(assembler.Accept(new Frame(FrameKind.Data, bytes.AsMemory(1 << 20).ToArray())));
        Assert.Equal(bytes.Length, budget.HeldBytes); // the array counts while it arrives, as a lease would

        var call = new GrpcInboundCall(1, assembler, new FakeServerCallContext(CancellationToken.None), default, null, null, 4, 1 << 20, budget);
        var served = new ServerCall(call, new MethodDescriptor("Svc", "M", 1) { ArrayArgument = typeof(double[]) }, new OffloadRpcOptions().CreateSerializerOptions());
        double[]? argument = served.CopyArray<double>(0);
        Assert.Same(receiver.Made, argument); // the array the bytes went into: no lease, no second copy
        Assert.Equal(sent, argument);
        Assert.Equal(0, budget.HeldBytes); // the method's memory from here
        Assert.Throws<ProtocolViolationException>(() => served.CopyArray<double>(0)); // named twice
        served.Complete(faulted: false);
        call.Dispose();
        Assert.Equal(sent, argument); // not a view of anything the call gave back

        // Asked for as another element type: its bytes all the same, copied (a lease on the way, given back).
        var other = new MessageAssembler(1 << 20, budget);
        other.ReceiveArray(ArrayReceiver.ForArray(typeof(double[])));
        Assert.True(other.Accept(new Frame(FrameKind.Head, ReplyHead([0x91, 0x00], 16, bytes.AsSpan(0, 16).ToArray()))));
        var otherCall = new GrpcInboundCall(1, other, new FakeServerCallContext(CancellationToken.None), default, null, null, 4, 1 << 20, budget);
        var otherServed = new ServerCall(otherCall, new MethodDescriptor("Svc", "M", 1), new OffloadRpcOptions().CreateSerializerOptions());
        Assert.Equal(System.Runtime.InteropServices.MemoryMarshal.Cast<byte, float>(bytes.AsSpan(0, 16)).ToArray(), otherServed.CopyArray<float>(0));
        otherServed.Complete(faulted: false);
        otherCall.Dispose();
        Assert.Equal(0, budget.HeldBytes);

        // Never taken (the argument was null, or the method failed first): the array leaves the budget with the call.
        var untaken = new MessageAssembler(1 << 20, budget);
        untaken.ReceiveArray(ArrayReceiver.ForArray(typeof(double[])));
        Assert.True(untaken.Accept(new Frame(FrameKind.Head, ReplyHead([0x91, 0xFF], 16, new byte[16]))));
        Assert.Equal(16, budget.HeldBytes);
        new GrpcInboundCall(1, untaken, new FakeServerCallContext(CancellationToken.None), default, null, null, 4, 1 << 20, budget).Dispose();
        Assert.Equal(0, budget.HeldBytes);

        // Above the largest array argument a server makes (heap committed whole at the first byte, where a lease's
        // pages cost nothing until they come), the argument keeps its lease: counted at the lease's size, copied out.
        Assert.Equal(1 << 20, MessageAssembler.MaxArrayArgumentBytes);
        var large = new MessageAssembler(1 << 20, budget);
        large.ReceiveArray(ArrayReceiver.ForArray(typeof(double[])), maxBytes: 8);
        Assert.True(large.Accept(new Frame(FrameKind.Head, ReplyHead([0x91, 0x00], 16, bytes.AsSpan(0, 16).ToArray()))));
        Assert.Equal(4096, budget.HeldBytes); // a lease of one page, not an array of 16 bytes
        var largeCall = new GrpcInboundCall(1, large, new FakeServerCallContext(CancellationToken.None), default, null, null, 4, 1 << 20, budget);
        Assert.False(largeCall.TryTakeArray(0, out double[]? _));
        var largeServed = new ServerCall(largeCall, new MethodDescriptor("Svc", "M", 1) { ArrayArgument = typeof(double[]) }, new OffloadRpcOptions().CreateSerializerOptions());
        Assert.Equal(sent[..2], largeServed.CopyArray<double>(0));
        largeServed.Complete(faulted: false);
        largeCall.Dispose();
        Assert.Equal(0, budget.HeldBytes);

        // A small array that rode in the request's one frame is copied out of the frame, with no lease.
        var whole = new Frame(FrameKind.Head, ReplyHead([0x91, 0x00], 16, bytes.AsSpan(0, 16).ToArray()));
        Assert.Equal(1, whole.WholeMessagePayloads(1024));
        var wholeCall = new GrpcInboundCall(1, new ReceivedRequest(whole, 1), new FakeServerCallContext(CancellationToken.None), default, null, null, 4, 1024, budget);
        var wholeServed = new ServerCall(wholeCall, new MethodDescriptor("Svc", "M", 1) { ArrayArgument = typeof(double[]) }, new OffloadRpcOptions().CreateSerializerOptions());
        Assert.Equal(sent[..2], wholeServed.CopyArray<double>(0));
        Assert.True(wholeCall.IsPayloadTaken(0));
        Assert.Equal(0, budget.HeldBytes);
        Assert.Throws<ProtocolViolationException>(() => wholeServed.CopyArray<double>(0));
        wholeServed.Complete(faulted: false);
        wholeCall.Dispose();
    }

    /// <summary>Makes a double[] as the real receiver does, and keeps it, so that a test can tell that array from a copy.</summary>
    private sealed class RecordingReceiver : ArrayReceiver
    {
        public double[]? Made { get; private set; }

        public override Type ArrayType => typeof(double[]);

        public override ReceivedArray? TryCreate(long bytes)
        {
            Made = new double[bytes / sizeof(double)];
            return new ReceivedArray<double>(Made);
        }
    }

    /// <summary>A receiver whose array the GC cannot give (a heap limit reached).</summary>
    private sealed class NoMemoryReceiver : ArrayReceiver
    {
        public override Type ArrayType => typeof(byte[]);

        public override ReceivedArray? TryCreate(long bytes) => throw new OutOfMemoryException();
    }

    /// <summary>A head of one payload of <paramref name="length"/> bytes, <paramref name="inline"/> of them in it.</summary>
    private static byte[] ReplyHead(byte[] body, long length, byte[]? inline = null)
    {
        byte[] head = new byte[4 + body.Length + 2 + 8 + (inline?.Length ?? 0)];
        System.Buffers.Binary.BinaryPrimitives.WriteUInt32LittleEndian(head, (uint)body.Length);
        body.CopyTo(head, 4);
        System.Buffers.Binary.BinaryPrimitives.WriteUInt16LittleEndian(head.AsSpan(4 + body.Length), 1);
        System.Buffers.Binary.BinaryPrimitives.WriteInt64LittleEndian(head.AsSpan(6 + body.Length), length);
        inline?.CopyTo(head, 14 + body.Length);
        return head;
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

    /// <summary>A head frame's bytes after its kind, laid out by hand: [u32 body length][body][u16 count][i64 length per payload][payload bytes].</summary>
    private static byte[] HeadBytes(byte[] body, byte[][] payloads)
    {
        var bytes = new List<byte>();
        bytes.AddRange(BitConverter.GetBytes((uint)body.Length));
        bytes.AddRange(body);
        bytes.AddRange(BitConverter.GetBytes((ushort)payloads.Length));
        foreach (byte[] payload in payloads)
        {
            bytes.AddRange(BitConverter.GetBytes((long)payload.Length));
        }

        foreach (byte[] payload in payloads)
        {
            bytes.AddRange(payload);
        }

        return [.. bytes];
    }

    /// <summary>A received head frame of <see cref="HeadBytes"/>, with <paramref name="extra"/> bytes after it.</summary>
    private static Frame ReceivedHead(byte[] body, byte[][] payloads, int extra = 0, FrameKind kind = FrameKind.Head) =>
        new(kind, (byte[])[.. HeadBytes(body, payloads), .. new byte[extra]]);

    [Fact]
    public void A_frame_is_a_whole_message_only_when_its_payloads_bytes_are_exactly_the_rest_of_it()
    {
        byte[] body = [0x92, 0x01, 0x02];
        Assert.Equal(0, ReceivedHead(body, []).WholeMessagePayloads(1024));
        Assert.True(ReceivedHead(body, []).IsWholeMessage(1024));
        Assert.Equal(2, ReceivedHead(body, [[1, 2, 3], [4, 5, 6, 7]]).WholeMessagePayloads(1024));
        Assert.False(ReceivedHead(body, [[1, 2, 3]]).IsWholeMessage(1024)); // a reply serves as its frame only without payloads

        Assert.Equal(-1, ReceivedHead(body, [[1, 2, 3]], extra: 1).WholeMessagePayloads(1024)); // a byte no payload announced
        Assert.Equal(-1, ReceivedHead(body, [[1, 2, 3]], kind: FrameKind.ItemHead).WholeMessagePayloads(1024));
        Assert.Equal(-1, ReceivedHead(body, []).WholeMessagePayloads(2)); // the body beyond the limit
        Assert.Equal(-1, ReceivedHead(body, [.. Enumerable.Repeat(new byte[1], Frame.MaxPayloads + 1)]).WholeMessagePayloads(1024));
        Assert.Equal(Frame.MaxPayloads, ReceivedHead(body, [.. Enumerable.Repeat(new byte[1], Frame.MaxPayloads)]).WholeMessagePayloads(1024));

        // Payload bytes that follow in data frames (the head announces more than it holds): assembled, not whole.
        Frame partial = ReceivedHead(body, [[1, 2, 3, 4]]);
        Frame truncated = new(FrameKind.Head, partial.First[..^1]);
        Assert.Equal(-1, truncated.WholeMessagePayloads(1024));
        var assembler = new MessageAssembler(1024);
        Assert.False(assembler.Accept(truncated));
        assembler.Dispose();

        // A length that is negative or runs past the frame.
        byte[] bad = ReceivedHead(body, [[1, 2, 3]]).First.ToArray();
        BitConverter.GetBytes(-1L).CopyTo(bad, 4 + body.Length + 2);
        Assert.Equal(-1, new Frame(FrameKind.Head, bad).WholeMessagePayloads(1024));
        BitConverter.GetBytes(long.MaxValue).CopyTo(bad, 4 + body.Length + 2);
        Assert.Equal(-1, new Frame(FrameKind.Head, bad).WholeMessagePayloads(1024));
    }

    [Fact]
    public void A_request_of_one_frame_is_served_from_it_its_byte_payloads_lent_in_place_and_the_others_copied_when_taken()
    {
        byte[] body = [0x92, 0x00, 0x01];
        byte[] laidOut = ReceivedHead(body, [[1, 2, 3], [4, 5, 6, 7], [8, 9]]).First.ToArray();
        byte[] pooled = System.Buffers.ArrayPool<byte>.Shared.Rent(laidOut.Length); // as gRPC's deserializer gives it
        laidOut.CopyTo(pooled, 0);
        var head = new Frame(FrameKind.Head, pooled.AsMemory(0, laidOut.Length), default, pooled);
        Assert.Equal(3, head.WholeMessagePayloads(1024));
        var call = new GrpcInboundCall(1, new ReceivedRequest(head, 3), new FakeServerCallContext(CancellationToken.None), default, null, null, 4, 1024);
        Assert.Equal(body, call.BodyMemory.ToArray());
        Assert.Equal(3, call.PayloadCount);
        Assert.Equal(9, call.PayloadBytes);

        var served = new ServerCall(call, new MethodDescriptor("Svc", "M", 1), new OffloadRpcOptions().CreateSerializerOptions());
        Memory<byte> lent = served.GetMemory<byte>(0);
        Assert.Equal(new byte[] { 1, 2, 3 }, lent.ToArray());
        Assert.True(System.Runtime.InteropServices.MemoryMarshal.TryGetArray<byte>(lent, out ArraySegment<byte> inFrame));
        Assert.True(System.Runtime.InteropServices.MemoryMarshal.TryGetArray(head.First, out ArraySegment<byte> frame));
        Assert.Same(frame.Array, inFrame.Array); // in place: no lease, no copy
        Assert.True(call.IsPayloadTaken(0));

        SharedBuffer taken = served.TakeSharedBuffer(1)!; // the method's beyond the call: a lease of its own
        Assert.Equal(new byte[] { 4, 5, 6, 7 }, taken.Span.ToArray());
        Assert.Equal(new ushort[] { 0x0908 }, served.GetMemory<ushort>(2).ToArray()); // not bytes: through a lease

        Assert.Throws<ProtocolViolationException>(() => served.GetMemory<byte>(0)); // each payload once
        Assert.Throws<ProtocolViolationException>(() => served.TakeSharedBuffer(1));
        Assert.Throws<ProtocolViolationException>(() => served.GetMemory<byte>(3)); // beyond what the frame carries

        served.Complete(faulted: false);
        call.Dispose();
        Assert.True(head.IsReleased);
        Assert.True(call.BodyMemory.IsEmpty); // nothing of the given-back buffer is read after the call
        Assert.Equal(9, call.PayloadBytes);
        Array.Clear(pooled); // the pool's again: whoever rents it next writes over it
        Assert.Equal(new byte[] { 4, 5, 6, 7 }, taken.Span.ToArray()); // the taken lease is a copy, not the frame's bytes
        taken.Dispose();
    }

    [Fact]
    public void A_reply_frame_without_payloads_is_its_own_reply_until_disposed()
    {
        Frame head = ReceivedHead([0x2A], []);
        var reply = new RpcReply(head, 0);
        Assert.Equal(new byte[] { 0x2A }, reply.Body.ToArray());
        Assert.Equal(0, reply.PayloadCount);
        Assert.Throws<ProtocolViolationException>(() => reply.TakePayload(0));
        reply.Dispose();
        Assert.True(head.IsReleased);
        Assert.Throws<ObjectDisposedException>(() => reply.Body.Length);
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
