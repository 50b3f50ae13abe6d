using System.Diagnostics;
using OffloadRpc.Fuzz.Targets;

namespace OffloadRpc.Fuzz;

/// <summary>
/// The fuzzer's smoke run, without AFL: every seed of the corpus, then deterministic random mutations
/// of them (bit flips, interesting values, insertions, deletions, splices), through every target on one
/// dedicated thread, each input bounded in time.
/// </summary>
public static class SmokeRun
{
    /// <summary>How long one input may take before it counts as a hang.</summary>
    public static readonly TimeSpan PerInput = TimeSpan.FromSeconds(10);

    private static readonly byte[] s_interesting = [0x00, 0x01, 0x7F, 0x80, 0xFF, 0xC0, 0xDD, 0xDC, 0x90, 0x91];

    /// <returns>The failures, one line each (empty: all passed).</returns>
    public static IReadOnlyList<string> Run(string corpus, int mutationsPerTarget, int seed, TextWriter? log)
    {
        var inputs = new List<(FuzzTarget Target, string Name, byte[] Data)>();
        foreach (FuzzTarget target in FuzzTarget.All)
        {
            string folder = Path.Combine(corpus, target.Name);
            byte[][] seeds = Directory.Exists(folder)
                ? Directory.GetFiles(folder).Order(StringComparer.Ordinal).Select(File.ReadAllBytes).ToArray()
                : target.Seeds().Select(s => s.Data).ToArray();
            string[] names = Directory.Exists(folder) ? Directory.GetFiles(folder).Order(StringComparer.Ordinal).Select(f => Path.GetFileName(f)).ToArray() : target.Seeds().Select(s => s.Name).ToArray();
            for (int i = 0; i < seeds.Length; i++)
            {
                inputs.Add((target, names[i], seeds[i]));
            }

            var random = new Random(HashCode.Combine(seed, target.Name.Length, target.Name[0]));
            for (int i = 0; i < mutationsPerTarget && seeds.Length > 0; i++)
            {
                inputs.Add((target, $"mutation {i} (seed {seed})", Mutate(seeds[random.Next(seeds.Length)], seeds[random.Next(seeds.Length)], random)));
            }
        }

        var failures = new List<string>();
        var stopwatch = Stopwatch.StartNew();
        var perTarget = new Dictionary<string, (int Count, TimeSpan Time)>();
        int index = -1;
        string? current = null;
        Exception? failure = null;
        using var ready = new SemaphoreSlim(0);
        using var done = new SemaphoreSlim(0);
        bool stop = false;
        var worker = new Thread(() =>
        {
            while (true)
            {
                ready.Wait();
                if (Volatile.Read(ref stop))
                {
                    return;
                }

                (FuzzTarget target, string _, byte[] data) = inputs[index];
                try
                {
                    target.Run(data);
                    failure = null;
                }
                catch (Exception ex)
                {
                    failure = ex;
                }

                done.Release();
            }
        })
        { IsBackground = true, Name = "fuzz smoke" };
        worker.Start();

        for (index = 0; index < inputs.Count; index++)
        {
            (FuzzTarget target, string name, byte[] data) = inputs[index];
            current = $"{target.Name} {name} [{Convert.ToHexString(data.AsSpan(0, Math.Min(data.Length, 64)))}{(data.Length > 64 ? "..." : string.Empty)}]";
            long started = Stopwatch.GetTimestamp();
            ready.Release();
            if (!done.Wait(PerInput))
            {
                failures.Add($"HANG {current}: no result within {PerInput.TotalSeconds} s");
                log?.WriteLine(failures[^1]);
                return failures; // the worker is stuck; its thread is a background one
            }

            (int count, TimeSpan time) = perTarget.GetValueOrDefault(target.Name);
            perTarget[target.Name] = (count + 1, time + Stopwatch.GetElapsedTime(started));
            if (failure is not null)
            {
                failures.Add($"FAIL {current}: {failure}");
                log?.WriteLine(failures[^1]);
            }
        }

        Volatile.Write(ref stop, true);
        ready.Release();
        foreach ((string name, (int count, TimeSpan time)) in perTarget)
        {
            log?.WriteLine($"{name,-10} {count,6} inputs {time.TotalSeconds,7:0.00} s");
        }

        log?.WriteLine($"{inputs.Count} inputs in {stopwatch.Elapsed.TotalSeconds:0.0} s, {failures.Count} failed");
        return failures;
    }

    /// <summary>One to four of AFL's havoc steps, deterministic for a given <paramref name="random"/>.</summary>
    public static byte[] Mutate(byte[] input, byte[] other, Random random)
    {
        var data = new List<byte>(input);
        int steps = 1 + random.Next(4);
        for (int step = 0; step < steps; step++)
        {
            int at = data.Count == 0 ? 0 : random.Next(data.Count);
            switch (random.Next(7))
            {
                case 0 when data.Count > 0:
                    data[at] ^= (byte)(1 << random.Next(8));
                    break;
                case 1 when data.Count > 0:
                    data[at] = s_interesting[random.Next(s_interesting.Length)];
                    break;
                case 2 when data.Count > 0:
                    data[at] = (byte)(data[at] + random.Next(-16, 17));
                    break;
                case 3:
                    data.InsertRange(at, Enumerable.Repeat((byte)random.Next(256), 1 + random.Next(8)));
                    break;
                case 4 when data.Count > 1:
                    data.RemoveRange(at, Math.Min(data.Count - at, 1 + random.Next(8)));
                    break;
                case 5 when data.Count >= 4:
                {
                    // An interesting 16- or 32-bit value (lengths, counts, offsets).
                    int[] values = [0, -1, 1, 0x7FFF, 0xFFFF, int.MaxValue, int.MinValue, 64, 4096, 65536];
                    BitConverter.GetBytes(values[random.Next(values.Length)]).AsSpan(0, random.Next(2) == 0 ? 2 : 4).ToArray()
                        .Select((b, i) => (b, i)).ToList().ForEach(x => { if (Math.Min(at, data.Count - 4) + x.i < data.Count) { data[Math.Min(at, data.Count - 4) + x.i] = x.b; } });
                    break;
                }

                default:
                {
                    // Splice: our head, the other input's tail.
                    int cut = other.Length == 0 ? 0 : random.Next(other.Length);
                    data.RemoveRange(at, data.Count - at);
                    data.AddRange(other.AsSpan(cut).ToArray());
                    break;
                }
            }
        }

        return [.. data];
    }
}
