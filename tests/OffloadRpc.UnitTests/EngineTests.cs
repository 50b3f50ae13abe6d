using CsCheck;
using OffloadRpc.Engines;
using Xunit;

namespace OffloadRpc.Tests;

/// <summary>Every engine and copy routine against a reference copy, over random sizes, alignments and overlaps.</summary>
public sealed class EngineTests
{
    private const int Arena = 3 << 20;

    [Fact]
    public unsafe void Non_temporal_and_temporal_copies_match_a_reference_at_any_size_and_alignment()
    {
        byte[] source = new byte[Arena];
        Random.Shared.NextBytes(source);
        byte[] destination = new byte[Arena];
        byte[] expected = new byte[Arena];
        Gen.Select(Gen.Int[0, (1 << 20) + 300], Gen.Int[0, 127], Gen.Int[0, 127], Gen.Bool)
            .Sample((length, sourceOffset, destinationOffset, bypass) =>
            {
                Array.Clear(destination);
                Array.Clear(expected);
                Array.Copy(source, sourceOffset, expected, destinationOffset, length);
                fixed (byte* s = source)
                fixed (byte* d = destination)
                {
                    CopyRoutines.Copy(s + sourceOffset, d + destinationOffset, (nuint)length, bypass);
                }

                return destination.AsSpan().SequenceEqual(expected);
            }, iter: 300, threads: 1);
    }

    [Fact]
    public unsafe void Overlapping_copies_keep_memmove_semantics()
    {
        byte[] buffer = new byte[Arena];
        Gen.Select(Gen.Int[0, 200_000], Gen.Int[0, 100_000], Gen.Int[0, 100_000], Gen.Bool)
            .Sample((length, from, to, bypass) =>
            {
                Random.Shared.NextBytes(buffer);
                byte[] expected = (byte[])buffer.Clone();
                Array.Copy(expected, from, expected, to, length); // Array.Copy handles overlap like memmove
                fixed (byte* b = buffer)
                {
                    CopyRoutines.Copy(b + from, b + to, (nuint)length, bypass);
                }

                return buffer.AsSpan().SequenceEqual(expected);
            }, iter: 100, threads: 1);
    }

    [Fact]
    public unsafe void The_worker_engine_completes_random_batches_exactly()
    {
        using var engine = new WorkerCopyEngine(threads: 2);
        byte[] source = new byte[16 << 20];
        Random.Shared.NextBytes(source);
        byte[] destination = new byte[16 << 20];
        var completion = new CopyCompletion();
        Gen.Int[1, 6].SelectMany(count => Gen.Select(Gen.Int[0, 2 << 20], Gen.Int[0, 63], Gen.Bool).Array[count])
            .Sample(copies =>
            {
                Array.Clear(destination);
                byte[] expected = new byte[destination.Length];
                var batch = new CopyDescriptor[copies.Length];
                long cursor = 0;
                fixed (byte* s = source)
                fixed (byte* d = destination)
                {
                    for (int i = 0; i < copies.Length; i++)
                    {
                        (int length, int skew, bool bypass) = copies[i];
                        long at = cursor + skew;
                        Array.Copy(source, at, expected, at, length);
                        batch[i] = CopyDescriptor.Create((nint)(s + at), (nint)(d + at), (ulong)length, bypass ? CachePolicy.Bypass : CachePolicy.Inject);
                        cursor = at + length;
                    }

                    engine.Submit(batch, completion);
                    completion.Wait();
                }

                return completion.IsCompleted && destination.AsSpan().SequenceEqual(expected);
            }, iter: 60, threads: 1);
    }

    [Fact]
    public unsafe void A_batch_mixing_an_overlapping_move_and_queued_chunks_completes_only_after_both()
    {
        // The overlapping move runs inline on the submitter, before the chunks are queued: the batch's
        // completion must not fire when that move finishes while the chunks still have to run.
        using var engine = new WorkerCopyEngine(threads: 1);
        byte[] scratch = new byte[1 << 20];
        byte[] source = new byte[8 << 20];
        Random.Shared.NextBytes(source);
        byte[] destination = new byte[8 << 20];
        var completion = new CopyCompletion();
        bool copiedWhenCompleted = false;
        using var continuationRan = new ManualResetEventSlim();
        fixed (byte* m = scratch)
        fixed (byte* s = source)
        fixed (byte* d = destination)
        {
            byte* dst = d;
            byte* src = s;
            completion.OnCompleted(
                _ =>
                {
                    copiedWhenCompleted = new ReadOnlySpan<byte>(dst, destination.Length).SequenceEqual(new ReadOnlySpan<byte>(src, source.Length));
                    continuationRan.Set();
                },
                null);
            CopyDescriptor[] batch =
            [
                CopyDescriptor.Create((nint)m, (nint)(m + 100), 1 << 19, CachePolicy.Inject),
                CopyDescriptor.Create((nint)s, (nint)d, (ulong)source.Length, CachePolicy.Bypass),
            ];
            engine.Submit(batch, completion);
            completion.Wait();

            // The waiter can see the count reach zero before the continuation that follows it has run.
            Assert.True(continuationRan.Wait(TimeSpan.FromMinutes(1)), "the completion never fired");
        }

        Assert.True(copiedWhenCompleted, "the completion fired before the queued chunks were copied");
        Assert.True(destination.AsSpan().SequenceEqual(source));
    }

    [Fact]
    public async Task Thousands_of_hand_offs_to_a_parking_worker_neither_hang_nor_return_early()
    {
        // No spinning: every submission has to wake a parked worker, and one completion record is
        // reused throughout, so a lost wake-up hangs (the bound below fails the test) and a stale
        // signal from the previous batch returns before the copy (the content check fails).
        using var engine = new WorkerCopyEngine(threads: 1, spinBeforePark: TimeSpan.Zero);
        await Task.Run(() => HandOffs(engine)).WaitAsync(TimeSpan.FromMinutes(2));
    }

    private static unsafe void HandOffs(WorkerCopyEngine engine)
    {
        var completion = new CopyCompletion();
        {
            byte[] source = new byte[64 << 10];
            byte[] destination = new byte[64 << 10];
            for (int i = 0; i < 5000; i++)
            {
                int length = 4096 + (i % 16) * 4096;
                source.AsSpan(0, length).Fill((byte)i);
                fixed (byte* s = source)
                fixed (byte* d = destination)
                {
                    engine.Submit([CopyDescriptor.Create((nint)s, (nint)d, (ulong)length, i % 2 == 0 ? CachePolicy.Inject : CachePolicy.Bypass)], completion);
                    completion.Wait();
                }

                if (destination[0] != (byte)i || destination[length - 1] != (byte)i)
                {
                    throw new Xunit.Sdk.XunitException($"batch {i} returned before its copy finished");
                }
            }
        }
    }

    [Fact]
    public void Idle_workers_park_instead_of_spinning()
    {
        using var engine = new WorkerCopyEngine(threads: 2, spinBeforePark: TimeSpan.FromMicroseconds(10));
        SpinWait.SpinUntil(() => engine.AllParked, TimeSpan.FromSeconds(30));
        Assert.True(engine.AllParked);
    }

    [Fact]
    public async Task Callers_that_help_the_workers_copy_every_chunk_exactly_once()
    {
        // Several submitters run queued chunks themselves while the workers take the rest: every copy
        // must complete with its own bytes, none twice (a chunk run twice would still look right, so each
        // copy's source changes right after its completion and the destination is checked afterwards).
        using var engine = new WorkerCopyEngine(threads: 1, spinBeforePark: TimeSpan.Zero);
        const int Length = (int)(3 * WorkerCopyEngine.ChunkBytes) + 4096;
        await Task.WhenAll(Enumerable.Range(0, 4).Select(t => Task.Factory.StartNew(() =>
        {
            byte[] source = new byte[Length];
            byte[] destination = new byte[Length];
            var completion = new CopyCompletion();
            for (int i = 0; i < 40; i++)
            {
                byte tag = (byte)((t * 40) + i);
                Array.Fill(source, tag);
                unsafe
                {
                    fixed (byte* s = source)
                    fixed (byte* d = destination)
                    {
                        engine.Submit([CopyDescriptor.Create((nint)s, (nint)d, Length, CachePolicy.Inject)], completion);
                        engine.HelpUntil(completion, help: i % 2 == 0);
                    }
                }

                Array.Fill(source, (byte)0xEE);
                Assert.True(destination.AsSpan().IndexOfAnyExcept(tag) < 0, $"copy {t}/{i} is incomplete or was run late");
            }
        }, TaskCreationOptions.LongRunning)));
    }

    [Fact]
    public void The_engine_catalog_lists_only_engines_that_run_and_each_runs_a_copy()
    {
        Assert.Equal(["cpu", "worker"], EngineCatalog.Describe().Select(e => e.Name));

        // Each listed engine copies for real (the worker engine named in the catalog is the shared one's kind).
        byte[] source = new byte[3 << 20];
        Random.Shared.NextBytes(source);
        using var worker = new WorkerCopyEngine(threads: 1);
        foreach (ICopyEngine engine in new ICopyEngine[] { CpuCopyEngine.Instance, worker })
        {
            Assert.Contains(engine.Name, EngineCatalog.Describe().Select(e => e.Name));
            byte[] destination = new byte[source.Length];
            var completion = new CopyCompletion();
            unsafe
            {
                fixed (byte* s = source)
                fixed (byte* d = destination)
                {
                    engine.Submit([CopyDescriptor.Create((nint)s, (nint)d, (ulong)source.Length, CachePolicy.Bypass)], completion);
                    completion.Wait();
                }
            }

            Assert.True(destination.AsSpan().SequenceEqual(source), engine.Name);
        }
    }

    [Theory]
    [InlineData("AuthenticAMD", null, "not an Intel CPU (AuthenticAMD)")]
    [InlineData("GenuineIntel", null, "no /dev/dsa")]
    [InlineData("GenuineIntel", "", "has no work queue")]
    [InlineData("GenuineIntel", "/dev/dsa/wq0.0", "wq0.0")]
    public void Dsa_detection_says_absent_and_why(string vendor, string? queues, string reason)
    {
        string[]? found = queues is null ? null : queues.Split(',', StringSplitOptions.RemoveEmptyEntries);
        string description = DsaDetection.Describe(vendor, found);
        Assert.StartsWith("absent: ", description);
        Assert.Contains(reason, description);
    }

    [Fact]
    public void Dsa_detection_on_this_machine_names_the_reason_that_applies()
    {
        string description = DsaDetection.Describe();
        Assert.StartsWith("absent: ", description);
        string vendor = File.ReadLines("/proc/cpuinfo").First(l => l.StartsWith("vendor_id", StringComparison.Ordinal)).Split(':')[1].Trim();
        if (vendor != "GenuineIntel")
        {
            Assert.Contains(vendor, description);
        }
        else if (!Directory.Exists("/dev/dsa"))
        {
            Assert.Contains("no /dev/dsa", description);
        }
    }
}
