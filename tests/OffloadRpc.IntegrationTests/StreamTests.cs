using System.Buffers;
using System.Runtime.InteropServices;
using OffloadRpc.Testing;
using OffloadRpc.TestContracts;
using OffloadRpc.Tests.Infrastructure;
using Xunit;

namespace OffloadRpc.Tests;

/// <summary>Streamed results (IAsyncEnumerable&lt;T&gt;) between this process and a typed server process: content, backpressure, cancellation, faults, peer death.</summary>
public sealed class StreamTests : IAsyncLifetime
{
    private PeerProcess _server = null!;
    private string _endpoint = null!;
    private OffloadRpcConnection _connection = null!;

    public async Task InitializeAsync()
    {
        _endpoint = Endpoints.Unique("streams");
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

    private IFrameSource Frames => _connection.GetService<IFrameSource>();

    private static ulong FrameChecksum(int size, int seed)
    {
        byte[] expected = new byte[size];
        Checksum64.Fill(expected, (ulong)seed);
        return Checksum64.Compute(expected);
    }

    [Fact]
    public async Task MessagePack_items_arrive_in_order_and_the_stream_ends_cleanly()
    {
        int next = 0;
        await foreach (Tick tick in Frames.TicksAsync(1000, "t"))
        {
            Assert.Equal(next, tick.Index);
            Assert.Equal("t", tick.Label);
            Assert.Equal(Checksum64.Compute(BitConverter.GetBytes(next)), tick.Checksum);
            next++;
        }

        Assert.Equal(1000, next);

        await foreach (Tick tick in Frames.TicksAsync(0, "none"))
        {
            Assert.Fail("an empty stream yields nothing");
        }
    }

    [Fact]
    public async Task Byte_frames_arrive_in_place_with_their_content()
    {
        const int Size = 1 << 20;
        int i = 0;
        await foreach (ReadOnlyMemory<byte> frame in Frames.FramesAsync(40, Size, 100))
        {
            Assert.Equal(Size, frame.Length);
            Assert.Equal(FrameChecksum(Size, 100 + i), Checksum64.Compute(frame.Span));
            Assert.True(MemoryMarshal.TryGetMemoryManager(frame, out MemoryManager<byte>? _), "an item is lent in shared memory, not copied into an array");
            i++;
        }

        Assert.Equal(40, i);
    }

    [Fact]
    public async Task Frames_of_an_unmanaged_type_other_than_byte_arrive_whole()
    {
        int i = 0;
        await foreach (ReadOnlyMemory<int> numbers in Frames.NumbersAsync(20, 5000))
        {
            Assert.Equal(5000, numbers.Length);
            for (int j = 0; j < numbers.Length; j++)
            {
                Assert.Equal((i * 1000) + j, numbers.Span[j]);
            }

            i++;
        }

        Assert.Equal(20, i);
    }

    [Fact]
    public async Task A_producer_exception_reaches_the_consumer_after_the_items_before_it()
    {
        var seen = new List<int>();
        var fault = await Assert.ThrowsAsync<RemoteInvocationException>(async () =>
        {
            await foreach (int value in Frames.FailingAsync(3))
            {
                seen.Add(value);
            }
        });

        Assert.Equal([0, 1, 2], seen);
        Assert.Equal(typeof(InvalidOperationException).FullName, fault.RemoteExceptionType);
        Assert.Contains("producer failed after 3", fault.RemoteMessage);
        Assert.Equal(7, await _connection.GetService<IImageService>().AddAsync(3, 4)); // the connection is fine
    }

    [Fact]
    public async Task A_slow_consumer_holds_the_producer_within_the_window()
    {
        const int Size = 1 << 20;
        const int Window = 16; // the default
        string tag = "slow-" + Guid.NewGuid().ToString("N");
        IFrameSource frames = Frames;
        long residentBefore = (await frames.StatusAsync("baseline")).ResidentBytes;
        int consumed = 0;
        int maxAhead = 0;
        await foreach (ReadOnlyMemory<byte> frame in frames.EndlessAsync(tag, Size))
        {
            Assert.Equal(FrameChecksum(Size, consumed), Checksum64.Compute(frame.Span));
            consumed++;
            await Task.Delay(2); // far slower than the producer, which only fills a frame
            ProducerStatus status = await frames.StatusAsync(tag);
            maxAhead = Math.Max(maxAhead, status.Produced - consumed);
            Assert.True(status.Produced <= consumed + Window, $"the producer made {status.Produced} frames while the consumer had taken {consumed} (window {Window})");
            if (consumed == 300)
            {
                break; // 300 MiB through a 16-frame window
            }
        }

        ProducerStatus final = await frames.StatusAsync(tag);
        await Eventually.TrueAsync(async () => (await frames.StatusAsync(tag)).Finished, "the producer stopped after the consumer left");
        Assert.True(maxAhead >= Window / 2, $"the producer ran ahead by at most {maxAhead}: the window is not used");

        // 300 frames of 1 MiB went through; the server's memory grew by far less (window plus arena slack).
        long grown = final.ResidentBytes - residentBefore;
        Assert.True(grown < 160L << 20, $"the server's resident memory grew by {grown >> 20} MiB while streaming 300 MiB");
    }

    [Fact]
    public async Task Breaking_out_of_the_enumeration_cancels_the_producer()
    {
        string tag = "break-" + Guid.NewGuid().ToString("N");
        IFrameSource frames = Frames;
        int taken = 0;
        await foreach (ReadOnlyMemory<byte> frame in frames.EndlessAsync(tag, 4096))
        {
            Assert.Equal(FrameChecksum(4096, taken), Checksum64.Compute(frame.Span));
            if (++taken == 5)
            {
                break;
            }
        }

        await Eventually.TrueAsync(async () => (await frames.StatusAsync(tag)).Finished, "the producer finished");
        Assert.True((await frames.StatusAsync(tag)).Cancelled, "the producer's token fired");
        Assert.Equal(9, await _connection.GetService<IImageService>().AddAsync(4, 5));
    }

    [Fact]
    public async Task Cancelling_the_consumer_token_cancels_the_producer()
    {
        string tag = "cancel-" + Guid.NewGuid().ToString("N");
        IFrameSource frames = Frames;
        using var cts = new CancellationTokenSource();
        int taken = 0;
        await Assert.ThrowsAnyAsync<OperationCanceledException>(async () =>
        {
            await foreach (ReadOnlyMemory<byte> frame in frames.EndlessAsync(tag, 4096).WithCancellation(cts.Token))
            {
                if (++taken == 3)
                {
                    cts.Cancel();
                }
            }
        });

        await Eventually.TrueAsync(async () => (await frames.StatusAsync(tag)).Finished, "the producer finished");
        Assert.True((await frames.StatusAsync(tag)).Cancelled, "the producer's token fired");

        // The method's own token works as well.
        string tag2 = "cancel2-" + Guid.NewGuid().ToString("N");
        using var cts2 = new CancellationTokenSource();
        await Assert.ThrowsAnyAsync<OperationCanceledException>(async () =>
        {
            await foreach (ReadOnlyMemory<byte> frame in frames.EndlessAsync(tag2, 4096, cts2.Token))
            {
                cts2.Cancel();
            }
        });

        await Eventually.TrueAsync(async () => (await frames.StatusAsync(tag2)).Cancelled, "the second producer's token fired");
    }

    [Fact]
    public async Task Many_streams_interleave_with_unary_calls_on_one_connection()
    {
        const int Size = 64 * 1024;
        IFrameSource frames = Frames;
        IImageService images = _connection.GetService<IImageService>();
        async Task<int> ConsumeAsync(int seed)
        {
            int i = 0;
            await foreach (ReadOnlyMemory<byte> frame in frames.FramesAsync(200, Size, seed))
            {
                Assert.Equal(FrameChecksum(Size, seed + i), Checksum64.Compute(frame.Span));
                i++;
                if (i % 20 == 0)
                {
                    Assert.Equal(seed + i, await images.AddAsync(seed, i));
                }
            }

            return i;
        }

        async Task<int> TicksAsync(string label)
        {
            int i = 0;
            await foreach (Tick tick in frames.TicksAsync(500, label))
            {
                Assert.Equal(i++, tick.Index);
                Assert.Equal(label, tick.Label);
            }

            return i;
        }

        Task<int>[] streams = [ConsumeAsync(1000), ConsumeAsync(2000), ConsumeAsync(3000), ConsumeAsync(4000), TicksAsync("a"), TicksAsync("b")];
        for (int k = 0; k < 50; k++)
        {
            Assert.Equal(k * 2, await images.AddAsync(k, k));
        }

        int[] counts = await Task.WhenAll(streams);
        Assert.Equal([200, 200, 200, 200, 500, 500], counts);
    }

    [Fact]
    public async Task SharedBuffer_items_move_to_the_consumer_and_stay_valid_after_the_stream()
    {
        const int Size = 4 << 20;
        var kept = new List<SharedBuffer>();
        int i = 0;
        await foreach (SharedBuffer frame in Frames.RenderAsync(12, Size, 500))
        {
            Assert.Equal(Size, frame.Length);
            Assert.Equal(FrameChecksum(Size, 500 + i), Checksum64.Compute(frame.Span));
            if (i % 4 == 0)
            {
                kept.Add(frame); // owned: valid after later items and after the stream ended
            }
            else
            {
                frame.Dispose();
            }

            i++;
        }

        Assert.Equal(12, i);
        for (int k = 0; k < kept.Count; k++)
        {
            Assert.Equal(FrameChecksum(Size, 500 + (k * 4)), Checksum64.Compute(kept[k].Span));
        }

        // A lease that came in a stream can be passed on (ownership moves again).
        ulong combined = await Frames.ChecksumLeasesAsync(AsAsync(kept));
        ulong expected = 0;
        for (int k = 0; k < kept.Count; k++)
        {
            expected = (expected * 31) + FrameChecksum(Size, 500 + (k * 4));
        }

        Assert.Equal(expected, combined);
    }

    [Fact]
    public async Task Leases_a_failing_server_method_took_from_a_streamed_argument_go_back_to_the_client()
    {
        // The client's arena holds 16 leases of 256 KiB. Each failing call below has the server take 4
        // without disposing them: were they not given back, the arena would run out by the fifth call
        // (a rent then fails after the 5 s wait with ArenaExhaustedException).
        const int Size = 256 << 10;
        await using OffloadRpcConnection small = await OffloadRpcConnection.ConnectAsync(_endpoint, new OffloadRpcOptions { SegmentSize = 4 << 20, MaxArenaBytes = 4 << 20, ArenaWaitTimeout = TimeSpan.FromSeconds(5) });
        IFrameSource frames = small.GetService<IFrameSource>();
        for (int call = 0; call < 24; call++)
        {
            RemoteInvocationException failed = await Assert.ThrowsAsync<RemoteInvocationException>(async () => await frames.HoardLeasesAsync(Rented(small, 6, Size), failAfter: 4).AsTask().WaitAsync(TimeSpan.FromSeconds(60)));
            Assert.Contains("failed holding 4 leases", failed.Message);

            int taken = 0;
            RemoteInvocationException duplex = await Assert.ThrowsAsync<RemoteInvocationException>(async () =>
            {
                await foreach (int length in frames.HoardEachAsync(Rented(small, 6, Size), failAfter: 4).WithCancellation(new CancellationTokenSource(TimeSpan.FromSeconds(60)).Token))
                {
                    Assert.Equal(Size, length);
                    taken++;
                }
            });
            Assert.Equal(4, taken);
            Assert.Contains("failed holding 4 leases", duplex.Message);
        }

        // Every lease is back: the whole arena can be rented at once, and the connection still works.
        var all = new List<SharedBuffer>();
        using (var cts = new CancellationTokenSource(TimeSpan.FromSeconds(10)))
        {
            for (int i = 0; i < 16; i++)
            {
                all.Add(small.Rent(Size, cts.Token));
            }
        }

        ulong combined = await frames.ChecksumLeasesAsync(AsAsync(all)); // the server disposes each
        Assert.NotEqual(0UL, combined);
        Assert.Equal(5, await small.GetService<IImageService>().AddAsync(2, 3));

        static async IAsyncEnumerable<SharedBuffer> Rented(OffloadRpcConnection connection, int count, int size)
        {
            for (int i = 0; i < count; i++)
            {
                await Task.Yield();
                SharedBuffer lease = connection.Rent(size);
                Checksum64.Fill(lease.Span, (ulong)i);
                yield return lease;
            }
        }
    }

    private static async IAsyncEnumerable<T> AsAsync<T>(IEnumerable<T> items)
    {
        foreach (T item in items)
        {
            await Task.Yield();
            yield return item;
        }
    }

    [Fact]
    public async Task A_stream_is_enumerated_once()
    {
        IAsyncEnumerable<Tick> ticks = Frames.TicksAsync(1, "once");
        IAsyncEnumerator<Tick> first = ticks.GetAsyncEnumerator();
        Assert.Throws<InvalidOperationException>(() => ticks.GetAsyncEnumerator());
        await first.DisposeAsync(); // never started: nothing was sent
    }
}

/// <summary>A server killed with SIGKILL in the middle of a stream.</summary>
public sealed class StreamPeerDeathTests
{
    [Fact]
    public async Task Peer_death_mid_stream_is_PeerDisconnectedException_for_the_consumer()
    {
        string endpoint = Endpoints.Unique("stream-death");
        await using PeerProcess server = PeerProcess.Start(["typed-server", endpoint]);
        server.WaitForLine("READY");
        try
        {
            await using OffloadRpcConnection connection = await OffloadRpcConnection.ConnectAsync(endpoint);
            IFrameSource frames = connection.GetService<IFrameSource>();
            int taken = 0;
            await Assert.ThrowsAsync<PeerDisconnectedException>(async () =>
            {
                await foreach (ReadOnlyMemory<byte> frame in frames.EndlessAsync("death", 64 * 1024))
                {
                    Assert.Equal(Checksum64.Compute(frame.Span), Checksum64.Compute(frame.Span)); // readable
                    if (++taken == 10)
                    {
                        server.Kill(); // SIGKILL
                    }
                }
            });

            Assert.True(taken >= 10);
            await Assert.ThrowsAsync<PeerDisconnectedException>(async () => await connection.GetService<IImageService>().AddAsync(1, 2));
        }
        finally
        {
            Endpoints.RemoveStale(endpoint);
        }
    }

    [Fact]
    public async Task Leases_received_before_peer_death_stay_valid()
    {
        string endpoint = Endpoints.Unique("stream-death-leases");
        await using PeerProcess server = PeerProcess.Start(["typed-server", endpoint]);
        server.WaitForLine("READY");
        try
        {
            await using OffloadRpcConnection connection = await OffloadRpcConnection.ConnectAsync(endpoint);
            IFrameSource frames = connection.GetService<IFrameSource>();
            var kept = new List<SharedBuffer>();
            await using (IAsyncEnumerator<SharedBuffer> stream = frames.RenderAsync(1000, 1 << 20, 9).GetAsyncEnumerator())
            {
                for (int i = 0; i < 3; i++)
                {
                    Assert.True(await stream.MoveNextAsync());
                    kept.Add(stream.Current);
                }

                server.Kill(); // SIGKILL
                await Assert.ThrowsAsync<PeerDisconnectedException>(async () =>
                {
                    while (await stream.MoveNextAsync())
                    {
                        stream.Current.Dispose();
                    }
                });
            }

            for (int i = 0; i < kept.Count; i++)
            {
                byte[] expected = new byte[1 << 20];
                Checksum64.Fill(expected, (ulong)(9 + i));
                Assert.Equal(Checksum64.Compute(expected), Checksum64.Compute(kept[i].Span)); // the mapping outlives the peer
                kept[i].Dispose();
            }
        }
        finally
        {
            Endpoints.RemoveStale(endpoint);
        }
    }
}
