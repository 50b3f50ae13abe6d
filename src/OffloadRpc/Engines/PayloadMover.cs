namespace OffloadRpc.Engines;

/// <summary>Moves one payload into shared memory following its <see cref="TransferPlan"/>.</summary>
internal static unsafe class PayloadMover
{
    [ThreadStatic]
    private static CopyCompletion? t_completion;

    /// <summary>Copies <paramref name="length"/> bytes; returns once every byte is in place (and fenced).</summary>
    public static void Move(byte* source, byte* destination, long length, in TransferPlan plan)
    {
        switch (plan.Mode)
        {
            case TransferMode.Offload:
            {
                // The copy runs on the worker threads; this thread waits without burning a core (or, when the
                // workers are parked, copies queued chunks itself instead of waiting for their wake-up).
                CopyCompletion completion = t_completion ??= new CopyCompletion();
                WorkerCopyEngine engine = WorkerCopyEngine.Shared;
                bool parked = engine.AllParked;
                engine.Submit([CopyDescriptor.Create((nint)source, (nint)destination, (ulong)length, plan.Cache)], completion);
                engine.HelpUntil(completion, help: parked);
                break;
            }

            case TransferMode.Hybrid:
            {
                // The caller and the workers copy disjoint parts at once, split by their measured bandwidth
                // so that they finish together (equal shares until a calibration says otherwise).
                WorkerCopyEngine engine = WorkerCopyEngine.Shared;
                double callerFraction = Calibration.Current?.CallerShare(length, engine.ThreadCount) ?? 1.0 / (engine.ThreadCount + 1);
                long share = (long)(length * callerFraction) & ~4095L;
                CopyCompletion completion = t_completion ??= new CopyCompletion();
                bool parked = engine.AllParked;
                if (length - share > 0)
                {
                    engine.Submit([CopyDescriptor.Create((nint)(source + share), (nint)(destination + share), (ulong)(length - share), plan.Cache)], completion);
                }

                CopyRoutines.Copy(source, destination, (nuint)share, plan.BypassCache);
                engine.HelpUntil(completion, help: parked);
                break;
            }

            default:
                CopyRoutines.Copy(source, destination, (nuint)length, plan.BypassCache);
                break;
        }

        TransferMetrics.Record(plan, length);
    }
}
