using System.Buffers.Binary;
using Grpc.Core;
using Grpc.Net.Client;
using OffloadRpc.Grpc.Internal;
using OffloadRpc.Testing;
using OffloadRpc.TestContracts;
using OffloadRpc.Tests.Infrastructure;
using Xunit;

namespace OffloadRpc.Tests;

/// <summary>
/// A raw gRPC client that writes frames by hand against a real server process: the buffers a request's
/// head names cost the server nothing until their bytes come, a head may name no more buffers than a
/// message carries, and a server out of room for buffers (mappings, or its budget of bytes) refuses calls instead of dying;
/// and a client does not take more of a server's replies into its memory than its own budget.
/// </summary>
[Collection(TransportSuite.Name)]
public sealed class GrpcHostilePeerTests(BothWaysServer server)
{
    private static readonly Marshaller<byte[]> Raw = new(static bytes => bytes, static bytes => bytes);

    /// <summary>ChecksumAsync takes one buffer: bound client-streaming, its request read frame by frame by the route.</summary>
    private static readonly Method<byte[], byte[]> Checksum = new(MethodType.DuplexStreaming, typeof(IImageService).FullName!, nameof(IImageService.ChecksumAsync), Raw, Raw);

    [Fact]
    public async Task A_head_that_names_more_buffers_than_a_message_carries_is_refused_as_a_protocol_violation()
    {
        using GrpcChannel channel = GrpcChannel.ForAddress(server.GrpcAddress);
        using AsyncDuplexStreamingCall<byte[], byte[]> call = channel.CreateCallInvoker().AsyncDuplexStreamingCall(Checksum, null, new CallOptions(deadline: DateTime.UtcNow.AddSeconds(30)));
        await call.RequestStream.WriteAsync(Head([.. Enumerable.Repeat(1L, Frame.MaxPayloads + 1)]));
        RpcException refused = await Assert.ThrowsAsync<RpcException>(() => call.ResponseStream.MoveNext());
        Assert.Equal(StatusCode.Internal, refused.StatusCode);
        Assert.Contains($"names {Frame.MaxPayloads + 1} payloads (at most {Frame.MaxPayloads})", refused.Trailers.GetValue(GrpcWire.ViolationTrailer), StringComparison.Ordinal);
        await AssertServesAsync(server.GrpcAddress);
    }

    [Theory]
    [InlineData(nameof(IImageService.AddAsync), (byte)FrameKind.ItemHead)] // bound unary: the frame gRPC deserialized
    [InlineData(nameof(IImageService.AddAsync), (byte)FrameKind.Credit)]
    [InlineData(nameof(IImageService.ChecksumAsync), (byte)FrameKind.Fault)] // bound client streaming: read by the route
    [InlineData(nameof(IImageService.ChecksumAsync), (byte)FrameKind.ItemHead)]
    public async Task A_request_that_does_not_start_with_its_head_is_refused_as_a_protocol_violation(string method, byte kindByte)
    {
        var kind = (FrameKind)kindByte;
        byte[] head = Head();
        head[0] = (byte)kind; // a well-formed head's bytes under another kind
        using GrpcChannel channel = GrpcChannel.ForAddress(server.GrpcAddress);
        var call = new Method<byte[], byte[]>(MethodType.Unary, typeof(IImageService).FullName!, method, Raw, Raw);
        RpcException refused = await Assert.ThrowsAsync<RpcException>(() => channel.CreateCallInvoker().AsyncUnaryCall(call, null, new CallOptions(deadline: DateTime.UtcNow.AddSeconds(30)), head).ResponseAsync);
        Assert.Equal(StatusCode.Internal, refused.StatusCode);
        Assert.Contains($"starts with a {kind} frame", refused.Trailers.GetValue(GrpcWire.ViolationTrailer), StringComparison.Ordinal);
        await AssertServesAsync(server.GrpcAddress);
    }

    [Fact]
    public async Task The_buffers_a_head_names_cost_the_server_no_mapping_until_their_bytes_arrive()
    {
        const int calls = 48;
        using GrpcChannel channel = GrpcChannel.ForAddress(server.GrpcAddress);
        using var stop = new CancellationTokenSource(TimeSpan.FromSeconds(120));
        await AssertServesAsync(server.GrpcAddress); // the server's buffers of an ordinary call made, and kept for the next
        int before = Mappings(server.ProcessId);
        var open = new List<AsyncDuplexStreamingCall<byte[], byte[]>>();
        var reads = new List<Task<bool>>();
        try
        {
            for (int i = 0; i < calls; i++)
            {
                // Sixteen buffers of 40 MiB named, one byte of the first sent: the server needs a lease for
                // that byte, and none yet for the fifteen others (before, it made all sixteen at the head).
                // (Above 32 MiB, so no mapping kept from an earlier call is reused: each lease is a new one.)
                AsyncDuplexStreamingCall<byte[], byte[]> call = channel.CreateCallInvoker().AsyncDuplexStreamingCall(Checksum, null, new CallOptions(cancellationToken: stop.Token));
                open.Add(call);
                await call.RequestStream.WriteAsync(Head([.. Enumerable.Repeat(40L << 20, Frame.MaxPayloads)]));
                await call.RequestStream.WriteAsync(Data(1));
                reads.Add(call.ResponseStream.MoveNext());
            }

            await Eventually.TrueAsync(() => Mappings(server.ProcessId) - before >= calls, "the server made the first buffer's lease of every call");
            await Task.Delay(500); // time for leases made past the first of each call, or for calls refused, to show
            int grown = Mappings(server.ProcessId) - before;
            Assert.True(grown < calls * 2, $"{calls} calls that sent one byte each took {grown} more mappings: the buffers not yet begun were mapped too ({calls * Frame.MaxPayloads} if all were)");
            Assert.DoesNotContain(reads, read => read.IsCompleted); // every call still waits for its bytes: none was refused
        }
        finally
        {
            foreach (AsyncDuplexStreamingCall<byte[], byte[]> call in open)
            {
                call.Dispose(); // cancels it: the server gives the leases back
            }
        }

        await Eventually.TrueAsync(() => Mappings(server.ProcessId) - before < calls / 2, "the leases of the cancelled calls given back");
        await AssertServesAsync(server.GrpcAddress);
    }

    [Fact]
    public Task A_server_out_of_room_for_buffers_refuses_calls_with_ResourceExhausted_and_lives_on() =>
        WithServerAsync("mappings", ["--max-mappings", "24"], async (process, address) =>
        {
            using GrpcChannel channel = GrpcChannel.ForAddress(address);
            using var held = new HeldCalls(channel);
            await held.OpenAsync(48, 1 << 20); // a buffer of 1 MiB begun and never finished: each call holds its lease

            await Eventually.TrueAsync(() => held.Reads.Count(read => read.IsFaulted) >= 12, "the calls past the server's room refused");
            held.AssertRefused("memory mappings");
            Assert.True(held.Reads.Count(read => !read.IsCompleted) >= 12, "the calls within the server's room still wait for their bytes");
            Assert.False(process.HasExited);

            // A typed client meets the same refusal while the room is taken: refused at its first data frame,
            // with most of its 64 MiB still to send and HTTP/2's window long used up, it ends all the same.
            await using OffloadRpcConnection connection = await OffloadRpcConnection.ConnectAsync(address, new OffloadRpcOptions { PreferSharedMemory = false });
            byte[] buffer = new byte[(64 << 20) + 5];
            Checksum64.Fill(buffer, 77);
            OffloadRpcException full = await Assert.ThrowsAsync<OffloadRpcException>(() => connection.GetService<IImageService>().ChecksumAsync(buffer).AsTask().WaitAsync(TimeSpan.FromSeconds(60)));
            Assert.Contains("no room", full.Message, StringComparison.Ordinal);

            // ...as does an item of a streamed argument that needs a lease...
            OffloadRpcException item = await Assert.ThrowsAsync<OffloadRpcException>(async () =>
            {
                await foreach (ulong _ in connection.GetService<IFrameSource>().ChecksumEachAsync(OneItem()).WithCancellation(new CancellationTokenSource(TimeSpan.FromSeconds(60)).Token))
                {
                    Assert.Fail("an item was served with no room for its lease");
                }
            });
            Assert.Contains("no room", item.Message, StringComparison.Ordinal);

            // ...and a one-message request whose inline bytes do not make it whole (it goes through a lease).
            byte[] odd = [.. Head(8, 8, 100), .. new byte[16]];
            var unary = new Method<byte[], byte[]>(MethodType.Unary, typeof(IImageService).FullName!, nameof(IImageService.AddAsync), Raw, Raw);
            RpcException oneFrame = await Assert.ThrowsAsync<RpcException>(() => channel.CreateCallInvoker().AsyncUnaryCall(unary, null, new CallOptions(deadline: DateTime.UtcNow.AddSeconds(30)), odd).ResponseAsync);
            Assert.Equal(StatusCode.ResourceExhausted, oneFrame.StatusCode);

            // ...and is served once the held calls end.
            held.Dispose();
            ulong expected = Checksum64.Compute(buffer);
            await ServedAgainAsync(async () => await connection.GetService<IImageService>().ChecksumAsync(buffer).AsTask().WaitAsync(TimeSpan.FromSeconds(60)) == expected, "a call with a buffer served after the held calls ended");
        });

    /// <summary>
    /// A <c>byte[]</c> argument of up to 1 MiB is read into its array, which counts its bytes from the first;
    /// any other buffer, and a larger array, go into a lease, which counts its bytes as they arrive and its
    /// mapping (a power of two of pages) once all are in. So a budget between the two sizes tells which way
    /// the server took.
    /// </summary>
    [Fact]
    public async Task An_array_argument_is_read_into_its_array_up_to_1_MiB_and_into_a_lease_above()
    {
        byte[] small = new byte[(512 << 10) + 5]; // a lease of it would be a mapping of 1 MiB
        Checksum64.Fill(small, 17);
        await WithServerAsync("arrays", ["--max-buffered-request-bytes", (768L << 10).ToString(System.Globalization.CultureInfo.InvariantCulture)], async (_, address) =>
        {
            await using OffloadRpcConnection connection = await OffloadRpcConnection.ConnectAsync(address, new OffloadRpcOptions { PreferSharedMemory = false });
            IImageService images = connection.GetService<IImageService>();
            Assert.Equal(small, await images.EchoAsync(small).AsTask().WaitAsync(TimeSpan.FromSeconds(60))); // 512 KiB + 5 counted: within 768 KiB
            OffloadRpcException leased = await Assert.ThrowsAsync<OffloadRpcException>(() => images.ChecksumAsync(small).AsTask().WaitAsync(TimeSpan.FromSeconds(60)));
            Assert.Contains("no room", leased.Message, StringComparison.Ordinal); // the same bytes as memory: a lease of 1 MiB
        });

        byte[] large = new byte[(1 << 20) + 5]; // above the largest array argument: a lease, a mapping of 2 MiB
        Checksum64.Fill(large, 18);
        await WithServerAsync("arrays-large", ["--max-buffered-request-bytes", (1536L << 10).ToString(System.Globalization.CultureInfo.InvariantCulture)], async (_, address) =>
        {
            await using OffloadRpcConnection connection = await OffloadRpcConnection.ConnectAsync(address, new OffloadRpcOptions { PreferSharedMemory = false });
            IImageService images = connection.GetService<IImageService>();
            OffloadRpcException refused = await Assert.ThrowsAsync<OffloadRpcException>(() => images.EchoAsync(large).AsTask().WaitAsync(TimeSpan.FromSeconds(60)));
            Assert.Contains("no room", refused.Message, StringComparison.Ordinal); // its last bytes make the lease count its mapping of 2 MiB
            byte[] fits = large[..(1 << 20)]; // 1 MiB exactly: an array (or a lease of the same size) within 1.5 MiB
            Assert.Equal(fits, await images.EchoAsync(fits).AsTask().WaitAsync(TimeSpan.FromSeconds(60)));
        });
    }

    [Fact]
    public Task A_server_past_its_budget_of_request_buffer_bytes_refuses_calls_with_ResourceExhausted_and_serves_again_when_they_end() =>
        WithServerAsync("buffered", ["--max-buffered-request-bytes", (64L << 20).ToString(System.Globalization.CultureInfo.InvariantCulture)], async (process, address) =>
        {
            const int buffer = 16 << 20; // a whole number of pages, a power of two: it counts exactly its bytes
            using GrpcChannel channel = GrpcChannel.ForAddress(address);
            using var held = new HeldCalls(channel);

            // Each call sends all of its buffer but the last byte and holds its lease, 16 MiB of the server's
            // memory: its bytes count as they arrive. Four fit the budget of 64 MiB exactly...
            await held.OpenAsync(4, buffer, send: buffer - 1);
            await Task.Delay(500); // the last bytes of the fourth read by the server (HTTP/2's window is far smaller than a buffer)

            // ...and the next four are refused at their first byte. (One byte each: a raw call refused while a write
            // of its is under way can have the gRPC client reset the stream and still send that write's DATA,
            // for which Kestrel closes the whole connection, the held calls on it too.)
            await held.OpenAsync(4, buffer, send: 1);
            await Eventually.TrueAsync(() => held.Reads.Count(read => read.IsFaulted) >= 4, "the calls past the server's budget refused");
            await Task.Delay(200); // room for a wrong fifth refusal to show
            Assert.Equal(4, held.Reads.Count(read => read.IsFaulted));
            held.AssertRefused("MaxBufferedRequestBytes");
            Assert.False(process.HasExited);

            // A typed call with a buffer meets the same refusal while the budget is taken...
            await using OffloadRpcConnection connection = await OffloadRpcConnection.ConnectAsync(address, new OffloadRpcOptions { PreferSharedMemory = false });
            byte[] bytes = new byte[(2 << 20) + 5];
            Checksum64.Fill(bytes, 91);
            OffloadRpcException full = await Assert.ThrowsAsync<OffloadRpcException>(() => connection.GetService<IImageService>().ChecksumAsync(bytes).AsTask().WaitAsync(TimeSpan.FromSeconds(60)));
            Assert.Contains("no room", full.Message, StringComparison.Ordinal);

            // ...as does a small buffer of floats, which rides in the request's one frame and is copied into a
            // lease while the arguments are decoded (no room there is not arguments that do not decode)...
            OffloadRpcException small = await Assert.ThrowsAsync<OffloadRpcException>(() => connection.GetService<IKitchenSink>().SumAsync(new float[250], new int[1]).AsTask().WaitAsync(TimeSpan.FromSeconds(60)));
            Assert.Contains("no room", small.Message, StringComparison.Ordinal);

            // ...but not a small array argument: it is copied out of that frame straight into the method's
            // array, ordinary memory as a MessagePack argument is, with no lease between.
            byte[] echo = new byte[1000];
            Checksum64.Fill(echo, 5);
            Assert.Equal(echo, await connection.GetService<IImageService>().EchoAsync(echo).AsTask().WaitAsync(TimeSpan.FromSeconds(60)));

            // A larger array argument (into a lease above 1 MiB) counts against the same budget: refused.
            OffloadRpcException large = await Assert.ThrowsAsync<OffloadRpcException>(() => connection.GetService<IImageService>().EchoAsync(bytes).AsTask().WaitAsync(TimeSpan.FromSeconds(60)));
            Assert.Contains("no room", large.Message, StringComparison.Ordinal);

            // ...and a head of 1 MiB (a large MessagePack body), which the server would keep while the call runs.
            AsyncDuplexStreamingCall<byte[], byte[]> big = held.Start();
            await big.RequestStream.WriteAsync(LargeHead(1 << 20, buffer));
            RpcException bigHead = await Assert.ThrowsAsync<RpcException>(() => big.ResponseStream.MoveNext());
            Assert.Equal(StatusCode.ResourceExhausted, bigHead.StatusCode);
            Assert.Contains("a request frame", bigHead.Status.Detail, StringComparison.Ordinal);

            // A call without buffers is served meanwhile...
            Assert.Equal(5, await connection.GetService<IImageService>().AddAsync(2, 3));

            // ...and all of the budget comes back once the held calls end: four calls of 16 MiB at once are served, each checksum right.
            held.Dispose();
            byte[][] four = [.. Enumerable.Range(0, 4).Select(i => { byte[] b = new byte[buffer]; Checksum64.Fill(b, (ulong)i); return b; })];
            ulong[] expected = [.. four.Select(b => Checksum64.Compute(b))];
            await ServedAgainAsync(
                async () =>
                {
                    ulong[] sums = await Task.WhenAll(four.Select(b => connection.GetService<IImageService>().ChecksumAsync(b).AsTask().WaitAsync(TimeSpan.FromSeconds(60))));
                    return sums.SequenceEqual(expected) ? true : throw new InvalidDataException($"wrong checksums: {string.Join(", ", sums)}");
                },
                "four calls of 16 MiB served at once after the held calls ended");
            Assert.Equal(Checksum64.Compute(bytes), await connection.GetService<IImageService>().ChecksumAsync(bytes));
            Assert.Equal(bytes, await connection.GetService<IImageService>().EchoAsync(bytes));
        });

    /// <summary>
    /// A head may name buffers of up to 2 GiB each, and its bytes cost the peer nothing: the budget counts a
    /// buffer's bytes as they arrive, not the size named. Before, a lease counted its whole mapping from its
    /// first byte, so two calls that named 2 GiB and sent a byte each (a few hundred bytes on the wire) held the
    /// default budget of 4 GiB, and every other caller's buffers were refused for as long as they stayed open.
    /// </summary>
    [Fact]
    public async Task Buffers_named_but_not_sent_do_not_take_the_budget_from_other_callers()
    {
        byte[] bytes = new byte[32 << 20]; // a lease of 32 MiB
        Checksum64.Fill(bytes, 23);
        ulong expected = Checksum64.Compute(bytes);

        // Calls that each name a buffer of 2 GiB and send its first byte (a step of 1 MiB counted), then another
        // caller's buffer served beside them, its checksum right, with none of the held calls refused: each
        // still waits for its bytes.
        async Task ServedBesideAsync(string address, int named, Func<HeldCalls, Task> then)
        {
            using GrpcChannel channel = GrpcChannel.ForAddress(address);
            using var held = new HeldCalls(channel);
            await held.OpenAsync(named, int.MaxValue);
            await using OffloadRpcConnection connection = await OffloadRpcConnection.ConnectAsync(address, new OffloadRpcOptions { PreferSharedMemory = false });
            Assert.Equal(expected, await connection.GetService<IImageService>().ChecksumAsync(bytes).AsTask().WaitAsync(TimeSpan.FromSeconds(60)));
            Assert.DoesNotContain(held.Reads, read => read.IsCompleted);
            await then(held);
        }

        // The default budget (4 GiB) and four such calls, 8 GiB named in all.
        await WithServerAsync("named", [], (_, address) => ServedBesideAsync(address, 4, _ => Task.CompletedTask));

        // A budget of 64 MiB: sixteen such calls take 16 of it, and the buffer of 32 MiB is served beside them.
        await WithServerAsync("named-small", ["--max-buffered-request-bytes", (64L << 20).ToString(System.Globalization.CultureInfo.InvariantCulture)], (process, address) => ServedBesideAsync(address, 16, async held =>
        {
            // The budget still bounds the bytes that do arrive: 56 MiB sent (a mapping of 56 MiB once whole) do not
            // fit beside the 16 held, and are refused on their way; 40 MiB do, and are served.
            await using OffloadRpcConnection connection = await OffloadRpcConnection.ConnectAsync(address, new OffloadRpcOptions { PreferSharedMemory = false });
            byte[] tooMany = new byte[56 << 20];
            OffloadRpcException full = await Assert.ThrowsAsync<OffloadRpcException>(() => connection.GetService<IImageService>().ChecksumAsync(tooMany).AsTask().WaitAsync(TimeSpan.FromSeconds(60)));
            Assert.Contains("MaxBufferedRequestBytes", full.Message, StringComparison.Ordinal);
            byte[] fits = new byte[40 << 20];
            Checksum64.Fill(fits, 29);
            Assert.Equal(Checksum64.Compute(fits), await connection.GetService<IImageService>().ChecksumAsync(fits).AsTask().WaitAsync(TimeSpan.FromSeconds(60)));
            Assert.DoesNotContain(held.Reads, read => read.IsCompleted); // the held calls still wait for their bytes
            Assert.False(process.HasExited);
        }));
    }

    [Fact]
    public Task An_item_of_a_streamed_argument_that_the_method_never_disposes_goes_back_to_the_budget_when_the_call_ends() =>
        WithServerAsync("sloppy", ["--max-buffered-request-bytes", (8L << 20).ToString(System.Globalization.CultureInfo.InvariantCulture)], async (_, address) =>
        {
            await using OffloadRpcConnection connection = await OffloadRpcConnection.ConnectAsync(address, new OffloadRpcOptions { PreferSharedMemory = false });
            IFrameSource frames = connection.GetService<IFrameSource>();

            // Each call keeps its first item of 1 MiB (a lease) past its end: were it not given back with the
            // call, the ninth call would find the 8 MiB budget full.
            for (int call = 0; call < 20; call++)
            {
                int[] first = new int[256 << 10];
                Checksum64.Fill(System.Runtime.InteropServices.MemoryMarshal.AsBytes(first.AsSpan()), (ulong)call);
                ulong expected = Checksum64.Compute(System.Runtime.InteropServices.MemoryMarshal.AsBytes(first.AsSpan()));
                Assert.Equal(expected, await frames.FirstChecksumAsync(Items(first, new int[256 << 10])).AsTask().WaitAsync(TimeSpan.FromSeconds(60)));
            }
        });

    [Fact]
    public async Task A_client_past_its_budget_of_reply_buffer_bytes_ends_the_call_with_ArenaExhaustedException_and_serves_on()
    {
        const int FrameBytes = 1024 * 1024 * 3; // RenderAsync(1024, 1024): a 4 MiB mapping
        await using OffloadRpcConnection connection = await OffloadRpcConnection.ConnectAsync(server.GrpcAddress, new OffloadRpcOptions { PreferSharedMemory = false, MaxBufferedReplyBytes = 16 << 20 });
        IImageService images = connection.GetService<IImageService>();

        // A reply larger than all of the budget is refused at its first bytes: the call ends, and so does the server's sending.
        byte[] large = new byte[24 << 20];
        Checksum64.Fill(large, 5);
        ArenaExhaustedException refused = await Assert.ThrowsAsync<ArenaExhaustedException>(() => images.EchoAsync(large).AsTask().WaitAsync(TimeSpan.FromSeconds(60)));
        Assert.Contains("OffloadRpcOptions.MaxBufferedReplyBytes", refused.Message, StringComparison.Ordinal);

        // An array result is the caller's own memory once decoded: replies within the budget are served one after another, every byte right.
        byte[] fits = new byte[12 << 20];
        Checksum64.Fill(fits, 6);
        for (int i = 0; i < 3; i++)
        {
            Assert.Equal(Checksum64.Compute(fits), Checksum64.Compute(await images.EchoAsync(fits).AsTask().WaitAsync(TimeSpan.FromSeconds(60))));
        }

        // Results the caller keeps count until disposed: four frames fill the budget, a fifth is refused...
        byte[] rendered = new byte[FrameBytes];
        Checksum64.Fill(rendered, (1024 * 31) + 1024);
        ulong expected = Checksum64.Compute(rendered);
        var held = new List<SharedBuffer>();
        try
        {
            for (int i = 0; i < 4; i++)
            {
                held.Add(await images.RenderAsync(1024, 1024).AsTask().WaitAsync(TimeSpan.FromSeconds(60)));
                Assert.Equal(expected, Checksum64.Compute(held[^1].Span));
            }

            await Assert.ThrowsAsync<ArenaExhaustedException>(() => images.RenderAsync(1024, 1024).AsTask().WaitAsync(TimeSpan.FromSeconds(60)));

            // ...as is an item of a streamed result past it, the items before it in the consumer's hands...
            ArenaExhaustedException item = await Assert.ThrowsAsync<ArenaExhaustedException>(async () =>
            {
                held[0].Dispose();
                held.RemoveAt(0);
                await foreach (SharedBuffer frame in connection.GetService<IFrameSource>().RenderAsync(3, FrameBytes, 40).WithCancellation(new CancellationTokenSource(TimeSpan.FromSeconds(60)).Token))
                {
                    held.Add(frame); // the first fits the room one disposed result left; the second does not
                }
            });
            Assert.Contains("MaxBufferedReplyBytes", item.Message, StringComparison.Ordinal);
            Assert.Equal(4, held.Count);
            Checksum64.Fill(rendered, 40);
            Assert.Equal(Checksum64.Compute(rendered), Checksum64.Compute(held[^1].Span));

            // ...while a call without buffers is served, and the room a disposed result leaves serves the next.
            Assert.Equal(5, await images.AddAsync(2, 3));
            held[0].Dispose();
            held.RemoveAt(0);
            using SharedBuffer again = await images.RenderAsync(1024, 1024).AsTask().WaitAsync(TimeSpan.FromSeconds(60));
            Assert.Equal(expected, Checksum64.Compute(again.Span));
        }
        finally
        {
            foreach (SharedBuffer frame in held)
            {
                frame.Dispose();
            }
        }

        // All of it back: a reply as large as the whole budget fits.
        byte[] whole = new byte[16 << 20];
        Checksum64.Fill(whole, 7);
        Assert.Equal(Checksum64.Compute(whole), Checksum64.Compute(await images.EchoAsync(whole).AsTask().WaitAsync(TimeSpan.FromSeconds(60))));
    }

    /// <summary>A grpc-server test peer started with <paramref name="args"/>, given to <paramref name="body"/> with its gRPC address; its sockets removed after.</summary>
    private static async Task WithServerAsync(string name, string[] args, Func<PeerProcess, string, Task> body)
    {
        string endpoint = Endpoints.Unique(name);
        try
        {
            await using PeerProcess process = PeerProcess.Start(["grpc-server", endpoint, .. args]);
            await body(process, process.WaitForLine("READY", TimeSpan.FromSeconds(60)).Split(' ')[2]);
        }
        finally
        {
            Endpoints.RemoveStale(endpoint);
        }
    }

    /// <summary>Retries <paramref name="attempt"/> until it succeeds: refused with "no room" until the server has seen every held call end.</summary>
    private static Task ServedAgainAsync(Func<Task<bool>> attempt, string what) =>
        Eventually.TrueAsync(
            async () =>
            {
                try
                {
                    return await attempt();
                }
                catch (OffloadRpcException)
                {
                    return false; // the server has not seen every cancellation yet
                }
            },
            what);

    /// <summary>Raw calls of ChecksumAsync that each begin a buffer and never finish it, holding its lease on the server; disposing cancels them all.</summary>
    private sealed class HeldCalls(GrpcChannel channel) : IDisposable
    {
        private readonly List<AsyncDuplexStreamingCall<byte[], byte[]>> _calls = [];

        /// <summary>The first read of each call opened by <see cref="OpenAsync"/>: faulted when the server refused it, pending while it waits for the rest of its buffer.</summary>
        public List<Task<bool>> Reads { get; } = [];

        public AsyncDuplexStreamingCall<byte[], byte[]> Start()
        {
            AsyncDuplexStreamingCall<byte[], byte[]> call = channel.CreateCallInvoker().AsyncDuplexStreamingCall(Checksum, null, new CallOptions(deadline: DateTime.UtcNow.AddSeconds(120)));
            _calls.Add(call);
            return call;
        }

        /// <summary>
        /// <paramref name="count"/> calls, each a head naming one buffer of <paramref name="bytes"/> bytes and the
        /// first <paramref name="send"/> of them, in data frames of at most 1 MiB; a call the server refuses
        /// on the way sends no more.
        /// </summary>
        public async Task OpenAsync(int count, long bytes, long send = 1)
        {
            for (int i = 0; i < count; i++)
            {
                AsyncDuplexStreamingCall<byte[], byte[]> call = Start();
                await call.RequestStream.WriteAsync(Head(bytes)).WaitAsync(TimeSpan.FromSeconds(60)); // a stall fails the test, not hangs it
                Task<bool> read = call.ResponseStream.MoveNext();
                Reads.Add(read);
                for (long sent = 0; sent < send && !read.IsCompleted;)
                {
                    int chunk = (int)Math.Min(send - sent, Frame.ChunkBytes);
                    try
                    {
                        await call.RequestStream.WriteAsync(Data(chunk)).WaitAsync(TimeSpan.FromSeconds(60));
                    }
                    catch (Exception ex) when (ex is RpcException or InvalidOperationException)
                    {
                        break; // refused: the call has ended
                    }

                    sent += chunk;
                }
            }
        }

        /// <summary>Every call that ended was refused with ResourceExhausted, its detail naming <paramref name="why"/>.</summary>
        public void AssertRefused(string why)
        {
            foreach (Task<bool> read in Reads.Where(read => read.IsCompleted))
            {
                RpcException refused = Assert.IsType<RpcException>(read.Exception!.InnerException);
                Assert.Equal(StatusCode.ResourceExhausted, refused.StatusCode);
                Assert.Contains(why, refused.Status.Detail, StringComparison.Ordinal);
            }
        }

        public void Dispose()
        {
            foreach (AsyncDuplexStreamingCall<byte[], byte[]> call in _calls)
            {
                call.Dispose();
            }
        }
    }

    private static async IAsyncEnumerable<ReadOnlyMemory<int>> Items(params int[][] items)
    {
        foreach (int[] item in items)
        {
            await Task.Yield();
            yield return item;
        }
    }

    private static async IAsyncEnumerable<ReadOnlyMemory<int>> OneItem()
    {
        await Task.Yield();
        yield return new int[64 << 10]; // 256 KiB: its bytes go in data frames, into a lease
    }

    /// <summary>A head frame whose MessagePack body is <paramref name="bodyBytes"/> bytes (an array holding one bin), naming one buffer of <paramref name="buffer"/> bytes.</summary>
    private static byte[] LargeHead(int bodyBytes, long buffer)
    {
        byte[] frame = new byte[1 + 4 + bodyBytes + 2 + 8];
        frame[0] = (byte)FrameKind.Head;
        BinaryPrimitives.WriteUInt32LittleEndian(frame.AsSpan(1), (uint)bodyBytes);
        frame[5] = 0x91; // [bin32 of the rest]
        frame[6] = 0xc6;
        BinaryPrimitives.WriteUInt32BigEndian(frame.AsSpan(7), (uint)(bodyBytes - 6));
        BinaryPrimitives.WriteUInt16LittleEndian(frame.AsSpan(5 + bodyBytes), 1);
        BinaryPrimitives.WriteInt64LittleEndian(frame.AsSpan(7 + bodyBytes), buffer);
        return frame;
    }

    /// <summary>A head frame with an empty MessagePack body naming buffers of <paramref name="lengths"/> bytes, none inline.</summary>
    private static byte[] Head(params long[] lengths)
    {
        byte[] frame = new byte[1 + 4 + 1 + 2 + (8 * lengths.Length)];
        frame[0] = (byte)FrameKind.Head;
        BinaryPrimitives.WriteUInt32LittleEndian(frame.AsSpan(1), 1);
        frame[5] = 0x90; // an empty MessagePack array
        BinaryPrimitives.WriteUInt16LittleEndian(frame.AsSpan(6), (ushort)lengths.Length);
        for (int i = 0; i < lengths.Length; i++)
        {
            BinaryPrimitives.WriteInt64LittleEndian(frame.AsSpan(8 + (8 * i)), lengths[i]);
        }

        return frame;
    }

    private static byte[] Data(int bytes)
    {
        byte[] frame = new byte[1 + bytes];
        frame[0] = (byte)FrameKind.Data;
        return frame;
    }

    /// <summary>The mappings of buffer leases a process holds (its memfd's name), not the runtime's and the GC's, which come and go on their own.</summary>
    private static int Mappings(int processId) => File.ReadLines($"/proc/{processId}/maps").Count(line => line.Contains("memfd:offloadrpc-local", StringComparison.Ordinal));

    private static async Task AssertServesAsync(string address)
    {
        await using OffloadRpcConnection connection = await OffloadRpcConnection.ConnectAsync(address, new OffloadRpcOptions { PreferSharedMemory = false });
        byte[] buffer = new byte[(1 << 20) + 3];
        Checksum64.Fill(buffer, 5);
        Assert.Equal(Checksum64.Compute(buffer), await connection.GetService<IImageService>().ChecksumAsync(buffer));
    }
}
