using System.Buffers.Binary;
using System.Diagnostics.Metrics;
using OffloadRpc.Engines;
using OffloadRpc.Testing;
using OffloadRpc.Tests.Infrastructure;
using OffloadRpc.Transport;
using Xunit;

namespace OffloadRpc.Tests;

/// <summary>Every transfer mode and cache policy moves exactly the caller's bytes to the server process.</summary>
public sealed class TransferModeTests : IAsyncLifetime
{
    private RemoteServer _server = null!;
    private RpcConnection _connection = null!;

    public async Task InitializeAsync()
    {
        _server = RemoteServer.Start("modes");
        _connection = await _server.ConnectAsync();
    }

    public async Task DisposeAsync()
    {
        await _connection.DisposeAsync();
        await _server.DisposeAsync();
    }

    [Theory]
    [InlineData(TransferMode.Copy, CachePolicy.Inject)]
    [InlineData(TransferMode.Copy, CachePolicy.Bypass)]
    [InlineData(TransferMode.Offload, CachePolicy.Inject)]
    [InlineData(TransferMode.Offload, CachePolicy.Bypass)]
    [InlineData(TransferMode.Hybrid, CachePolicy.Inject)]
    [InlineData(TransferMode.Hybrid, CachePolicy.Bypass)]
    [InlineData(TransferMode.Pipelined, CachePolicy.Inject)]
    [InlineData(TransferMode.Pipelined, CachePolicy.Bypass)]
    [InlineData(TransferMode.Auto, CachePolicy.Auto)]
    public async Task Each_mode_delivers_identical_bytes(TransferMode mode, CachePolicy cache)
    {
        foreach (int size in new[] { 0, 100, 5_000, (3 << 20) + 13, 40 << 20 })
        {
            byte[] payload = GC.AllocateUninitializedArray<byte>(size);
            Checksum64.Fill(payload, (ulong)size * 7 + (ulong)mode);
            // Unaligned source on purpose: slice off the first byte.
            ReadOnlyMemory<byte> source = payload.AsMemory(size > 0 ? 1 : 0);
            using RpcReply reply = await _connection.CallAsync(PeerMethods.Checksum, default, [OutboundPayload.Copy(source, mode, cache)]);
            Assert.Equal(source.Length, BinaryPrimitives.ReadInt64LittleEndian(reply.Body[8..]));
            Assert.Equal(Checksum64.Compute(source.Span), BinaryPrimitives.ReadUInt64LittleEndian(reply.Body[16..]));
        }
    }

    [Fact]
    public async Task Offloaded_calls_return_before_their_copy_and_many_in_flight_all_arrive_intact()
    {
        // One thread starts 12 calls without awaiting: each hands its bytes to the copy workers and
        // returns; the worker that finishes a copy publishes that request.
        var payloads = new byte[12][];
        var calls = new ValueTask<RpcReply>[12];
        for (int i = 0; i < calls.Length; i++)
        {
            payloads[i] = GC.AllocateUninitializedArray<byte>((4 << 20) + i * 4096);
            Checksum64.Fill(payloads[i], (ulong)i + 900);
            calls[i] = _connection.CallAsync(PeerMethods.Checksum, default, [OutboundPayload.Copy(payloads[i], TransferMode.Offload, CachePolicy.Inject)]);
        }

        for (int i = 0; i < calls.Length; i++)
        {
            using RpcReply reply = await calls[i];
            Assert.Equal(payloads[i].Length, BinaryPrimitives.ReadInt64LittleEndian(reply.Body[8..]));
            Assert.Equal(Checksum64.Compute(payloads[i]), BinaryPrimitives.ReadUInt64LittleEndian(reply.Body[16..]));
        }

        // An offloaded request mixed with a lease and a small inline payload.
        SharedBuffer lease = _connection.Rent(10_000);
        Checksum64.Fill(lease.Span, 5);
        ulong leaseSum = Checksum64.Compute(lease.Span);
        byte[] big = new byte[6 << 20];
        Checksum64.Fill(big, 6);
        using (RpcReply mixed = await _connection.CallAsync(PeerMethods.Checksum, "mixed"u8, [OutboundPayload.Copy(big, TransferMode.Offload, CachePolicy.Bypass), OutboundPayload.Move(lease), OutboundPayload.Copy(new byte[100])]))
        {
            Assert.Equal(Checksum64.Compute(big), BinaryPrimitives.ReadUInt64LittleEndian(mixed.Body[16..]));
            Assert.Equal(leaseSum, BinaryPrimitives.ReadUInt64LittleEndian(mixed.Body[32..]));
            Assert.Equal(100, BinaryPrimitives.ReadInt64LittleEndian(mixed.Body[40..]));
        }

        Assert.False(lease.IsValid);
        await Eventually.TrueAsync(() => _connection.Arena.UsedBytes == 0, "every offloaded block is back");
    }

    [Fact]
    public async Task A_pipelined_payload_is_read_by_the_server_while_later_chunks_are_still_being_copied()
    {
        byte[] payload = GC.AllocateUninitializedArray<byte>(256 << 20);
        Checksum64.Fill(payload, 12);
        ValueTask<RpcReply> call = _connection.CallAsync(PeerMethods.StreamChecksum, default, [OutboundPayload.Copy(payload, TransferMode.Pipelined, CachePolicy.Bypass)]);
        long copied = System.Diagnostics.Stopwatch.GetTimestamp(); // CallAsync returns once every chunk is written
        using RpcReply reply = await call;
        Assert.Equal(Checksum64.Compute(payload), BinaryPrimitives.ReadUInt64LittleEndian(reply.Body));
        Assert.Equal(payload.Length, BinaryPrimitives.ReadInt64LittleEndian(reply.Body[8..]));
        long firstRead = BinaryPrimitives.ReadInt64LittleEndian(reply.Body[16..]); // the server's clock: the same monotonic clock
        Assert.True(firstRead < copied, "the server should have read its first chunk before the client finished copying 256 MiB");

        // The same payload taken whole (not as a stream) waits for every byte.
        using RpcReply whole = await _connection.CallAsync(PeerMethods.Checksum, default, [OutboundPayload.Copy(payload.AsMemory(0, 8 << 20), TransferMode.Pipelined, CachePolicy.Inject)]);
        Assert.Equal(Checksum64.Compute(payload.AsSpan(0, 8 << 20)), BinaryPrimitives.ReadUInt64LittleEndian(whole.Body[16..]));
        await Eventually.TrueAsync(() => _connection.Arena.UsedBytes == 0, "every pipelined block is back");
    }

    [Fact]
    public void A_calibration_makes_Auto_pick_the_fastest_measured_plan_within_the_constraints()
    {
        var calibration = new CalibrationResult("test", DateTimeOffset.UtcNow, 32 << 20, 1, 20, [
            new CalibrationPoint(1 << 20, CopyInjectGbps: 50, CopyBypassGbps: 20, OffloadInjectGbps: 10, HybridInjectGbps: 30, HybridBypassGbps: 15),
            new CalibrationPoint(64 << 20, CopyInjectGbps: 18, CopyBypassGbps: 22, OffloadInjectGbps: 17, HybridInjectGbps: 20, HybridBypassGbps: 26),
        ]);
        Assert.Equal(new TransferPlan(TransferMode.Copy, CachePolicy.Inject), calibration.Best(2 << 20, TransferMode.Auto, CachePolicy.Auto));
        Assert.Equal(new TransferPlan(TransferMode.Hybrid, CachePolicy.Bypass), calibration.Best(100 << 20, TransferMode.Auto, CachePolicy.Auto));
        Assert.Equal(new TransferPlan(TransferMode.Copy, CachePolicy.Bypass), calibration.Best(64 << 20, TransferMode.Copy, CachePolicy.Auto));
        Assert.Equal(new TransferPlan(TransferMode.Hybrid, CachePolicy.Inject), calibration.Best(1 << 20, TransferMode.Auto, CachePolicy.Auto) with { Mode = TransferMode.Hybrid });
        Assert.Equal(new TransferPlan(TransferMode.Offload, CachePolicy.Inject), calibration.Best(64 << 20, TransferMode.Offload, CachePolicy.Auto));

        // Hybrid splits by measured bandwidth: a caller twice as fast as one worker takes two thirds.
        Assert.Equal(2.0 / 3, new CalibrationResult("t", DateTimeOffset.UtcNow, 1, 1, 0, [new CalibrationPoint(1 << 20, 40, 0, 20, 0, 0)]).CallerShare(1 << 20, 1), 3);

        Calibration.Use(calibration);
        try
        {
            Assert.Equal(new TransferPlan(TransferMode.Hybrid, CachePolicy.Bypass), TransferPolicy.Resolve(80 << 20, TransferMode.Auto, CachePolicy.Auto));
            // A pipelined payload of a single chunk has nothing to overlap, calibration or not.
            Assert.Equal(TransferMode.Copy, TransferPolicy.Resolve(1 << 20, TransferMode.Pipelined, CachePolicy.Auto).Mode);
            Assert.Equal(TransferMode.Pipelined, TransferPolicy.Resolve(4 << 20, TransferMode.Pipelined, CachePolicy.Auto).Mode);
        }
        finally
        {
            Calibration.Use(null);
        }
    }

    [Fact]
    public void Auto_copies_small_payloads_inline_splits_large_ones_and_bypasses_the_cache_above_it()
    {
        Calibration.Use(null); // the built-in rules, whatever this machine has stored
        Assert.Equal(new TransferPlan(TransferMode.Copy, CachePolicy.Inject), TransferPolicy.Resolve(1 << 20, TransferMode.Auto, CachePolicy.Auto));
        Assert.Equal(TransferMode.Hybrid, TransferPolicy.Resolve(16 << 20, TransferMode.Auto, CachePolicy.Auto).Mode);
        Assert.Equal(CachePolicy.Bypass, TransferPolicy.Resolve(TransferPolicy.LastLevelCacheBytes + 1, TransferMode.Auto, CachePolicy.Auto).Cache);
        Assert.Equal(CachePolicy.Inject, TransferPolicy.Resolve(TransferPolicy.LastLevelCacheBytes, TransferMode.Auto, CachePolicy.Auto).Cache);
        Assert.Equal(new TransferPlan(TransferMode.Offload, CachePolicy.Bypass), TransferPolicy.Resolve(1 << 20, TransferMode.Offload, CachePolicy.Bypass));
        Assert.Equal(TransferMode.Copy, TransferPolicy.Resolve(100, TransferMode.Hybrid, CachePolicy.Inject).Mode); // too small to share
        Assert.True(TransferPolicy.LastLevelCacheBytes >= 1 << 20);
    }

    [Fact]
    public async Task Decisions_and_bytes_per_mode_are_published_as_metrics()
    {
        var seen = new List<(string Instrument, long Value, string Mode, string Cache)>();
        using var listener = new MeterListener();
        listener.InstrumentPublished = (instrument, l) =>
        {
            if (instrument.Meter.Name == "OffloadRpc")
            {
                l.EnableMeasurementEvents(instrument);
            }
        };
        listener.SetMeasurementEventCallback<long>((instrument, value, tags, _) =>
        {
            string mode = string.Empty, cache = string.Empty;
            foreach (KeyValuePair<string, object?> tag in tags)
            {
                if (tag.Key == "mode")
                {
                    mode = (string)tag.Value!;
                }
                else if (tag.Key == "cache")
                {
                    cache = (string)tag.Value!;
                }
            }

            lock (seen)
            {
                seen.Add((instrument.Name, value, mode, cache));
            }
        });
        listener.Start();

        using (RpcReply reply = await _connection.CallAsync(PeerMethods.Checksum, default, [OutboundPayload.Copy(new byte[2 << 20], TransferMode.Hybrid, CachePolicy.Bypass)]))
        {
        }

        lock (seen)
        {
            Assert.Contains(seen, m => m.Instrument == "offloadrpc.transfer.bytes" && m.Value == 2 << 20 && m.Mode == "hybrid" && m.Cache == "bypass");
            Assert.Contains(seen, m => m.Instrument == "offloadrpc.transfers" && m.Value == 1 && m.Mode == "hybrid" && m.Cache == "bypass");
        }
    }
}
