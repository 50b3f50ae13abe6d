using System.Buffers.Binary;
using OffloadRpc.Testing;
using OffloadRpc.TestContracts;
using OffloadRpc.Tests.Infrastructure;
using Xunit;

namespace OffloadRpc.Tests;

/// <summary>The public API end to end: generated proxies in this process, generated stubs in a server process.</summary>
public sealed class TypedServiceTests : IAsyncLifetime
{
    private PeerProcess _server = null!;
    private string _endpoint = null!;
    private OffloadRpcConnection _connection = null!;

    public async Task InitializeAsync()
    {
        _endpoint = Endpoints.Unique("typed");
        _server = PeerProcess.Start(["typed-server", _endpoint]);
        _server.WaitForLine("READY");
        _connection = await OffloadRpcConnection.ConnectAsync(_endpoint);
    }

    public async Task DisposeAsync()
    {
        await _connection.DisposeAsync();
        await _server.DisposeAsync();
        Endpoints.RemoveStale(_endpoint);
    }

    private IImageService Images => _connection.GetService<IImageService>();

    private IKitchenSink Sink => _connection.GetService<IKitchenSink>();

    [Fact]
    public async Task Rent_with_a_token_gives_up_when_the_arena_stays_full_and_works_again_once_space_comes_back()
    {
        await using OffloadRpcConnection small = await OffloadRpcConnection.ConnectAsync(_endpoint, new OffloadRpcOptions { SegmentSize = 1 << 20, MaxArenaBytes = 1 << 20, ArenaWaitTimeout = TimeSpan.FromSeconds(20) });
        SharedBuffer held = small.Rent(1 << 20);
        using var cts = new CancellationTokenSource(TimeSpan.FromMilliseconds(200));
        Assert.ThrowsAny<OperationCanceledException>(() => small.Rent(1 << 20, cts.Token)); // long before the 20 s arena timeout
        held.Dispose();
        using (SharedBuffer next = small.Rent(1 << 20, CancellationToken.None))
        {
            Assert.Equal(1 << 20, next.Length);
        }

        byte[] data = new byte[4096]; // the arena is free again: a call through it works
        Checksum64.Fill(data, 7);
        Assert.Equal(Checksum64.Compute(data), await small.GetService<IImageService>().ChecksumAsync(data));
    }

    [Fact]
    public async Task The_design_example_works_across_processes()
    {
        Assert.Equal(5, await Images.AddAsync(2, 3));
        Assert.Same(Images, _connection.GetService<IImageService>());

        byte[] data = new byte[100_000];
        Checksum64.Fill(data, 1);
        Assert.Equal(data, await Images.EchoAsync(data));

        byte[] batch = new byte[64 * 1024];
        for (int i = 0; i < batch.Length; i++)
        {
            batch[i] = (byte)(i / 1024 % 2 == 0 ? 250 : 10); // even blocks bright, odd blocks dark
        }

        Detection[] detections = await Images.DetectAsync(batch, new DetectOptions { Threshold = 0.5f, Label = "bright", Classes = [1, 2] });
        Assert.Equal(32, detections.Length);
        Assert.All(detections, d => Assert.Equal(0, d.X % 2));
        Assert.All(detections, d => Assert.Equal("bright", d.Label));
    }

    [Fact]
    public async Task A_256_MiB_ReadOnlyMemory_arrives_intact()
    {
        byte[] frame = GC.AllocateUninitializedArray<byte>(256 << 20);
        Checksum64.Fill(frame, 256);
        Assert.Equal(Checksum64.Compute(frame), await Images.ChecksumAsync(frame));
    }

    [Fact]
    public async Task SharedBuffer_moves_both_ways_without_a_copy()
    {
        // Server -> client: rendered into shared memory the server rented from our connection.
        using (SharedBuffer rendered = await Images.RenderAsync(640, 480))
        {
            byte[] expected = new byte[640 * 480 * 3];
            Checksum64.Fill(expected, 640 * 31 + 480);
            Assert.Equal(expected.Length, rendered.Length);
            Assert.Equal(Checksum64.Compute(expected), Checksum64.Compute(rendered.Span));
        }

        // Client -> server: written in place, ownership moves (the server verifies the content).
        SharedBuffer frame = _connection.Rent(3840 * 2160 * 3);
        Checksum64.Fill(frame.Span[8..], 4);
        BinaryPrimitives.WriteUInt64LittleEndian(frame.Span, Checksum64.Compute(frame.Span[8..]));
        await Images.ProcessAsync(frame);
        Assert.False(frame.IsValid);

        // A corrupted frame is caught by the server, so the check above is real.
        SharedBuffer bad = _connection.Rent(1000);
        bad.Span.Fill(1);
        var ex = await Assert.ThrowsAsync<RemoteInvocationException>(async () => await Images.ProcessAsync(bad));
        Assert.Equal(typeof(InvalidDataException).FullName, ex.RemoteExceptionType);

        using SharedBuffer? maybe = await Sink.MaybeLeaseAsync(10);
        Assert.NotNull(maybe);
        Assert.All(maybe!.Span.ToArray(), b => Assert.Equal(0x5A, b));
        Assert.Null(await Sink.MaybeLeaseAsync(-1));
    }

    [Fact]
    public async Task Every_parameter_kind_crosses()
    {
        Assert.Equal("ab", await Sink.ConcatAsync("a", "b"));
        Assert.Equal("a<null>", await Sink.ConcatAsync("a", null));
        await Sink.DoNothingAsync();
        Assert.Equal(Channel.Blue, await Sink.NextChannelAsync(Channel.Green));
        List<string> parts = await Sink.SplitAsync("x,y,z", ',');
        Assert.Equal(new[] { "x", "y", "z" }, parts);
        double[] scaled = await Sink.ScaleAsync([1.0, 2.5], 2);
        Assert.Equal(new[] { 2.0, 5.0 }, scaled);
        Assert.Equal(1.5 + 2.5 + 10 + 20, await Sink.SumAsync(new float[] { 1.5f, 2.5f }, new int[] { 10, 20 }));

        using SharedBuffer third = _connection.Rent(300);
        Assert.Equal(100 + 200 + 300 + 400, await Sink.TotalLengthAsync(new byte[100], new byte[200], third, new byte[400]));

        ReadOnlyMemory<byte> reversed = await Sink.ReverseAsync(new byte[] { 1, 2, 3 });
        Assert.Equal(new byte[] { 3, 2, 1 }, reversed.ToArray());
        int[]? negated = await Sink.MaybeAsync([1, 2]);
        Assert.Equal(new[] { -1, -2 }, negated);
        Assert.Null(await Sink.MaybeAsync(null));
        string[] words = await Sink.WordsAsync(["a", "b"], new Dictionary<string, int> { ["a"] = 1 });
        Assert.Equal(new[] { "a=1", "b=0" }, words);
        Assert.Equal(3.75m, await Sink.AddDecimalAsync(1.25m, 2.5m));
        var moment = new DateTime(2026, 11, 25, 12, 0, 0, DateTimeKind.Utc);
        Assert.Equal(moment.AddHours(3), await Sink.ShiftAsync(moment, TimeSpan.FromHours(3)));
        Assert.Equal((4, "abab"), await Sink.TupleAsync(2, "ab"));
    }

    [Fact]
    public async Task A_Stream_argument_that_fails_while_it_is_sent_fails_the_call_with_its_own_exception()
    {
        byte[] data = new byte[32 << 20];
        IOException own = await Assert.ThrowsAsync<IOException>(async () => await Sink.ConsumeStreamAsync(new BreakingStream(data, breakAt: 8 << 20)));
        Assert.Equal("the disk went away", own.Message);

        // The same through a stream that cannot seek (sent through a ring, its length unknown).
        IOException ringed = await Assert.ThrowsAsync<IOException>(async () => await Sink.CopyStreamAsync(new BreakingStream(data, breakAt: 8 << 20, seekable: false), useAsync: true).AsTask().WaitAsync(TimeSpan.FromSeconds(60)));
        Assert.Equal("the disk went away", ringed.Message);

        // The connection serves on.
        Checksum64.Fill(data, 5);
        long[] result = await Sink.ConsumeStreamAsync(new MemoryStream(data, writable: false));
        Assert.Equal((long)Checksum64.Compute(data), result[0]);
        Assert.Equal(data.Length, result[1]);
    }

    [Fact]
    public async Task A_Stream_argument_that_cannot_seek_is_sent_as_it_is_read_and_ends_where_it_ends()
    {
        // Around the 1 MiB pipeline chunk and the 4 MiB ring the stream goes through, and several times round it.
        const int Chunk = 1 << 20;
        const int Ring = 4 << 20;
        foreach (int size in new[] { 0, 1, Chunk - 1, Chunk, Chunk + 1, Ring - 1, Ring, Ring + 1, (13 << 20) + 7 })
        {
            byte[] data = GC.AllocateUninitializedArray<byte>(size);
            Checksum64.Fill(data, (ulong)size + 3);
            foreach (bool useAsync in new[] { true, false })
            {
                long[] copied = await Sink.CopyStreamAsync(new NonSeekable(data, readLimit: 300_000), useAsync).AsTask().WaitAsync(TimeSpan.FromSeconds(60));
                Assert.Equal((long)Checksum64.Compute(data), copied[0]);
                Assert.Equal(size, copied[1]);
                Assert.Equal(0, copied[4]); // the server's Stream has no Length: it ends where the client's ended
                if (useAsync && size > 0)
                {
                    Assert.Equal(copied[2], copied[3]); // handed over in place from the ring
                }
            }

            // ConsumeStreamAsync asks for the Length, which a stream of unknown length does not have.
            RemoteInvocationException noLength = await Assert.ThrowsAsync<RemoteInvocationException>(() => Sink.ConsumeStreamAsync(new NonSeekable(data, readLimit: 300_000)).AsTask().WaitAsync(TimeSpan.FromSeconds(60)));
            Assert.Equal(typeof(NotSupportedException).FullName, noLength.RemoteExceptionType);
        }
    }

    [Fact]
    public async Task A_Stream_that_cannot_seek_is_not_gathered_first_a_stream_many_times_the_arena_goes_through()
    {
        // An 8 MiB arena could not hold a 96 MiB argument gathered into one buffer; through its ring (a quarter of the arena) it goes.
        await using OffloadRpcConnection small = await OffloadRpcConnection.ConnectAsync(_endpoint, new OffloadRpcOptions { SegmentSize = 8 << 20, MaxArenaBytes = 8 << 20, ArenaWaitTimeout = TimeSpan.FromSeconds(10) });
        IKitchenSink sink = small.GetService<IKitchenSink>();
        byte[] data = GC.AllocateUninitializedArray<byte>(96 << 20);
        Checksum64.Fill(data, 96);
        long[] copied = await sink.CopyStreamAsync(new NonSeekable(data, readLimit: 1 << 20), useAsync: true).AsTask().WaitAsync(TimeSpan.FromSeconds(120));
        Assert.Equal((long)Checksum64.Compute(data), copied[0]);
        Assert.Equal(data.Length, copied[1]);

        // A method that reads only the start and returns: the client stops sending, the call completes, the ring goes back.
        for (int i = 0; i < 5; i++)
        {
            Assert.Equal(3 << 20, await sink.ReadPrefixAsync(new NonSeekable(data, readLimit: 1 << 20), 3 << 20).AsTask().WaitAsync(TimeSpan.FromSeconds(60)));
        }

        Assert.Equal(5, await small.GetService<IImageService>().AddAsync(2, 3));
        using SharedBuffer whole = small.Rent(8 << 20, new CancellationTokenSource(TimeSpan.FromSeconds(10)).Token); // every ring went back
    }

    [Fact]
    public async Task A_seekable_Stream_longer_than_2_GiB_goes_through_its_ring_with_its_Length()
    {
        // Past int.MaxValue: no single payload could carry it; through a ring of a few MiB it goes, each byte checked.
        long length = (2L << 30) + 12345;
        long[] result = await Sink.VerifyPatternAsync(new PatternStream(length)).AsTask().WaitAsync(TimeSpan.FromSeconds(240));
        Assert.True(result[0] == length, $"result {string.Join(", ", result)}");
        Assert.Equal(-1, result[1]);
        Assert.Equal(length, result[2]);
    }

    /// <summary>A seekable stream of <c>length</c> bytes of the block pattern, made as it is read.</summary>
    private sealed class PatternStream(long length) : Stream
    {
        private long _position;

        public override bool CanRead => true;

        public override bool CanSeek => true;

        public override bool CanWrite => false;

        public override long Length => length;

        public override long Position { get => _position; set => _position = value; }

        public override int Read(Span<byte> buffer)
        {
            int count = (int)Math.Min(buffer.Length, length - _position);
            BlockPattern.Fill(buffer[..count], _position);
            _position += count;
            return count;
        }

        public override int Read(byte[] buffer, int offset, int count) => Read(buffer.AsSpan(offset, count));

        public override ValueTask<int> ReadAsync(Memory<byte> buffer, CancellationToken cancellationToken = default) => ValueTask.FromResult(Read(buffer.Span));

        public override void Flush()
        {
        }

        public override long Seek(long offset, SeekOrigin origin) => _position = origin switch
        {
            SeekOrigin.Begin => offset,
            SeekOrigin.Current => _position + offset,
            _ => length + offset,
        };

        public override void SetLength(long value) => throw new NotSupportedException();

        public override void Write(byte[] buffer, int offset, int count) => throw new NotSupportedException();
    }

    [Fact]
    public async Task A_method_that_returns_before_the_end_of_a_quiet_Stream_answers_at_once()
    {
        // A pipe that sent 64 KiB and went quiet: the server reads 4 KiB and answers. The call completes
        // without waiting for the pipe to speak again (its pending read is cancelled), and the ring goes back.
        await using OffloadRpcConnection small = await OffloadRpcConnection.ConnectAsync(_endpoint, new OffloadRpcOptions { SegmentSize = 8 << 20, MaxArenaBytes = 8 << 20, ArenaWaitTimeout = TimeSpan.FromSeconds(10) });
        IKitchenSink sink = small.GetService<IKitchenSink>();
        for (int i = 0; i < 3; i++)
        {
            var quiet = new QuietStream(64 << 10);
            Assert.Equal(4096, await sink.ReadPrefixAsync(quiet, 4096).AsTask().WaitAsync(TimeSpan.FromSeconds(30)));
            Assert.True(quiet.ReadCancelled);
        }

        using SharedBuffer whole = small.Rent(8 << 20, new CancellationTokenSource(TimeSpan.FromSeconds(10)).Token); // every ring went back
    }

    /// <summary>A stream whose reads throw past <c>breakAt</c> bytes (seekable or not).</summary>
    private sealed class BreakingStream(byte[] data, int breakAt, bool seekable = true) : MemoryStream(data, writable: false)
    {
        public override bool CanSeek => seekable;

        public override int Read(Span<byte> buffer) => Position >= breakAt ? throw new IOException("the disk went away") : base.Read(buffer[..Math.Min(buffer.Length, breakAt - (int)Position)]);

        public override ValueTask<int> ReadAsync(Memory<byte> buffer, CancellationToken cancellationToken = default) => ValueTask.FromResult(Read(buffer.Span));
    }

    /// <summary>A stream that cannot seek (its length unknown until it ends), as a pipe or a socket: each read returns at most <c>readLimit</c> bytes.</summary>
    private sealed class NonSeekable(byte[] data, int readLimit = int.MaxValue) : MemoryStream(data, writable: false)
    {
        public override bool CanSeek => false;

        public override int Read(Span<byte> buffer) => base.Read(buffer[..Math.Min(buffer.Length, readLimit)]);

        public override ValueTask<int> ReadAsync(Memory<byte> buffer, CancellationToken cancellationToken = default) => ValueTask.FromResult(Read(buffer.Span));
    }

    /// <summary>A memory stream that notes when its last byte was read (Stopwatch ticks, one clock for the machine's processes).</summary>
    private sealed class LastReadStream(byte[] data) : MemoryStream(data, writable: false)
    {
        public long LastRead { get; private set; }

        public override async ValueTask<int> ReadAsync(Memory<byte> buffer, CancellationToken cancellationToken = default)
        {
            int read = await base.ReadAsync(buffer, cancellationToken);
            if (Position == Length && LastRead == 0)
            {
                LastRead = System.Diagnostics.Stopwatch.GetTimestamp();
            }

            return read;
        }

        public override int Read(Span<byte> buffer)
        {
            int read = base.Read(buffer);
            if (Position == Length && LastRead == 0)
            {
                LastRead = System.Diagnostics.Stopwatch.GetTimestamp();
            }

            return read;
        }
    }

    [Fact]
    public async Task A_Stream_parameter_is_pipelined_the_method_reads_it_while_it_is_still_arriving()
    {
        byte[] data = GC.AllocateUninitializedArray<byte>(256 << 20);
        Checksum64.Fill(data, 77);
        var source = new LastReadStream(data);
        long[] result = await Sink.ConsumeStreamAsync(source); // read straight into shared memory while the server reads it out
        Assert.Equal((long)Checksum64.Compute(data), result[0]);
        Assert.Equal(data.Length, result[1]);
        Assert.True(source.LastRead > 0 && result[2] < source.LastRead, "the server method should have read its first chunk before the client finished reading its 256 MiB stream");

        byte[] sevens = new byte[3 << 20];
        Array.Fill(sevens, (byte)7, 0, 1_000_000);
        Assert.Equal(1_000_000, await Sink.CountBytesAsync(ChunksOf(sevens, 700_000)));

        static async IAsyncEnumerable<ReadOnlyMemory<byte>> ChunksOf(byte[] data, int size)
        {
            for (int i = 0; i < data.Length; i += size)
            {
                await Task.Yield();
                yield return data.AsMemory(i, Math.Min(size, data.Length - i));
            }
        }
    }

    [Fact]
    public async Task A_Stream_parameter_read_with_CopyTo_hands_its_chunks_over_in_place_with_their_content()
    {
        foreach (int size in new[] { 1, 4095, (1 << 20) + 1, 40 << 20 })
        {
            byte[] data = GC.AllocateUninitializedArray<byte>(size);
            Checksum64.Fill(data, (ulong)size);

            long[] copied = await Sink.CopyStreamAsync(new MemoryStream(data, writable: false), useAsync: true);
            Assert.Equal((long)Checksum64.Compute(data), copied[0]);
            Assert.Equal(size, copied[1]);
            Assert.True(copied[2] >= 1, $"{size} bytes came in {copied[2]} writes");
            Assert.Equal(copied[2], copied[3]); // every write was memory in place, none went through an array

            long[] blocking = await Sink.CopyStreamAsync(new MemoryStream(data, writable: false), useAsync: false);
            Assert.Equal((long)Checksum64.Compute(data), blocking[0]);
            Assert.Equal(size, blocking[1]);
        }
    }

    [Fact]
    public async Task An_async_enumerable_argument_is_gathered_without_blocking_a_single_threaded_callers_context()
    {
        // The chunks' continuations need the caller's one thread: enumerating them synchronously on
        // that thread (ToBlockingEnumerable) would deadlock; gathering them asynchronously does not.
        byte[] sevens = new byte[1 << 20];
        Array.Fill(sevens, (byte)7, 0, 300_000);
        using var context = new SingleThreadContext();
        Task<long> call = context.Run(() => Sink.CountBytesAsync(ChunksOnContext(sevens, 64 << 10)).AsTask());
        Assert.Equal(300_000, await call.WaitAsync(TimeSpan.FromSeconds(60)));
        Assert.Equal(0, await Images.AddAsync(0, 0)); // and the connection is fine afterwards

        static async IAsyncEnumerable<ReadOnlyMemory<byte>> ChunksOnContext(byte[] data, int size)
        {
            for (int i = 0; i < data.Length; i += size)
            {
                await Task.Delay(1); // resumes through the captured single-threaded context
                Assert.IsType<SingleThreadContext.Context>(SynchronizationContext.Current);
                yield return data.AsMemory(i, Math.Min(size, data.Length - i));
            }
        }
    }

    [Fact]
    public async Task Cancelling_while_an_async_enumerable_argument_is_still_being_gathered_ends_the_call_with_OperationCanceledException()
    {
        using var cts = new CancellationTokenSource();
        var started = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
        ValueTask<long> call = Sink.CountBytesAsync(Endless(started));
        await started.Task.WaitAsync(TimeSpan.FromSeconds(30));
        Assert.False(call.IsCompleted); // nothing is sent before the chunks end
        await cts.CancelAsync();
        await Assert.ThrowsAnyAsync<OperationCanceledException>(async () => await call.AsTask().WaitAsync(TimeSpan.FromSeconds(30)));
        Assert.Equal(5, await Images.AddAsync(2, 3));

        // The method has no token of its own: the enumerable's cancellation is what ends it here.
        async IAsyncEnumerable<ReadOnlyMemory<byte>> Endless(TaskCompletionSource first)
        {
            yield return new byte[16];
            first.TrySetResult();
            await Task.Delay(Timeout.Infinite, cts.Token);
            yield return new byte[16];
        }
    }

    [Fact]
    public async Task A_MessagePack_resolver_on_the_options_applies_to_that_connection_only()
    {
        var options = new OffloadRpcOptions { MessagePackResolver = MessagePack.Resolvers.CompositeResolver.Create(new ShoutingResolver(), MessagePack.Resolvers.StandardResolver.Instance) };
        await using OffloadRpcConnection shouting = await OffloadRpcConnection.ConnectAsync(_endpoint, options);
        byte[] batch = new byte[4096];
        Array.Fill(batch, (byte)250);
        var detect = new DetectOptions { Threshold = 0.5f, Label = "bright", Classes = [1] };

        Detection[] loud = await shouting.GetService<IImageService>().DetectAsync(batch, detect);
        Detection[] plain = await Images.DetectAsync(batch, detect);

        Assert.Equal(4, loud.Length);
        Assert.All(loud, d => Assert.Equal("BRIGHT", d.Label)); // written by this connection's formatter
        Assert.All(plain, d => Assert.Equal("bright", d.Label)); // the other connection never saw it
        Assert.Equal("bright", detect.Label);
    }

    /// <summary>Writes DetectOptions with an upper-cased label: its effect is visible in what the server returns.</summary>
    private sealed class ShoutingResolver : MessagePack.IFormatterResolver
    {
        public MessagePack.Formatters.IMessagePackFormatter<T>? GetFormatter<T>() =>
            typeof(T) == typeof(DetectOptions) ? (MessagePack.Formatters.IMessagePackFormatter<T>)(object)new ShoutingFormatter() : null;

        private sealed class ShoutingFormatter : MessagePack.Formatters.IMessagePackFormatter<DetectOptions>
        {
            public void Serialize(ref MessagePack.MessagePackWriter writer, DetectOptions value, MessagePack.MessagePackSerializerOptions options) =>
                MessagePack.Resolvers.StandardResolver.Instance.GetFormatter<DetectOptions>()!.Serialize(
                    ref writer, new DetectOptions { Threshold = value.Threshold, Label = value.Label?.ToUpperInvariant(), Classes = value.Classes }, options);

            public DetectOptions Deserialize(ref MessagePack.MessagePackReader reader, MessagePack.MessagePackSerializerOptions options) =>
                MessagePack.Resolvers.StandardResolver.Instance.GetFormatter<DetectOptions>()!.Deserialize(ref reader, options);
        }
    }

    [Fact]
    public async Task A_lease_whose_method_throws_without_disposing_it_goes_back_to_the_client()
    {
        // An arena with room for two 3 MiB leases: if a rejected lease were not given back, the third
        // Rent would wait for space and fail after ArenaWaitTimeout.
        var options = new OffloadRpcOptions { SegmentSize = 4 << 20, MaxArenaBytes = 8 << 20, ArenaWaitTimeout = TimeSpan.FromSeconds(10) };
        await using OffloadRpcConnection small = await OffloadRpcConnection.ConnectAsync(_endpoint, options);
        IKitchenSink sink = small.GetService<IKitchenSink>();
        for (int i = 0; i < 8; i++)
        {
            SharedBuffer lease = small.Rent(3 << 20);
            lease.Span.Fill((byte)(i + 1));
            var ex = await Assert.ThrowsAsync<RemoteInvocationException>(() => sink.RejectAsync(lease));
            Assert.Equal($"rejected a frame of {3 << 20} bytes starting with {i + 1}", ex.RemoteMessage);
            Assert.False(lease.IsValid); // it moved with the call
        }
    }

    [Fact]
    public async Task Cancellation_reaches_the_server_and_the_caller_gets_OperationCanceledException()
    {
        int before = await Sink.CancellationsObservedAsync();
        using var cts = new CancellationTokenSource(TimeSpan.FromMilliseconds(200));
        await Assert.ThrowsAnyAsync<OperationCanceledException>(() => Sink.SleepAsync(60_000, cts.Token));
        await Eventually.TrueAsync(async () => await Sink.CancellationsObservedAsync() == before + 1, "the server's token fired");
    }

    [Fact]
    public async Task Server_exceptions_surface_as_RemoteInvocationException()
    {
        var ex = await Assert.ThrowsAsync<RemoteInvocationException>(() => Sink.FailAsync("no such frame"));
        Assert.Equal(typeof(InvalidOperationException).FullName, ex.RemoteExceptionType);
        Assert.Equal("no such frame", ex.RemoteMessage);
        Assert.Contains(nameof(IKitchenSink.FailAsync), ex.RemoteStackTrace);
    }

    [Fact]
    public async Task The_call_context_names_the_caller_and_is_null_outside_calls()
    {
        Assert.Equal($"{Environment.ProcessId}:{Interop.LinuxNative.GetEuid()}", await Sink.WhoCalledAsync());
        Assert.Null(OffloadCallContext.Current);
    }

    [Fact]
    public async Task Many_threads_share_one_connection()
    {
        await Task.WhenAll(Enumerable.Range(0, 8).Select(t => Task.Run(async () =>
        {
            for (int i = 0; i < 500; i++)
            {
                Assert.Equal(t + i, await Images.AddAsync(t, i));
            }
        })));
    }

    [Fact]
    public async Task An_unserved_service_is_reported_by_GetService()
    {
        var ex = Assert.Throws<ContractMismatchException>(() => _connection.GetService<IVersioned>());
        Assert.Equal("OffloadRpc.TestContracts.IVersioned", ex.ServiceName);
        Assert.Throws<InvalidOperationException>(() => _connection.GetService<IDisposable>());
        await Task.CompletedTask;
    }
}

/// <summary>A client and a server built from different versions of one interface.</summary>
public sealed class ContractVersionTests
{
    [Fact]
    public async Task A_client_built_against_another_version_gets_ContractMismatchException_naming_the_service()
    {
        string endpoint = Endpoints.Unique("versioned");
        await using PeerProcess server = PeerProcess.Start(["typed-server", endpoint, "--versioned"]);
        server.WaitForLine("READY");
        try
        {
            _ = typeof(IVersioned); // this process has version 1 compiled in; the server version 2
            var ex = await Assert.ThrowsAsync<ContractMismatchException>(() => OffloadRpcConnection.ConnectAsync(endpoint));
            Assert.Equal("OffloadRpc.TestContracts.IVersioned", ex.ServiceName);
            Assert.Contains("OffloadRpc.TestContracts.IVersioned", ex.Message);
            Assert.Contains("FAILED OffloadRpc.ContractMismatchException", server.WaitForLine("FAILED"));
        }
        finally
        {
            Endpoints.RemoveStale(endpoint);
        }
    }
}
