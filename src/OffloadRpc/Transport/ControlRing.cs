namespace OffloadRpc.Transport;

/// <summary>
/// A bounded multi-producer, single-consumer ring of fixed-size slots in shared memory.
/// <para>
/// Each slot starts with a 64-bit sequence word (the Vyukov bounded-queue protocol). Slot i starts
/// at sequence i. A producer that finds sequence == position claims the position with a
/// compare-and-swap on its private tail (producers live in one process, so the tail is not shared
/// and the peer cannot corrupt it), writes the slot and publishes sequence = position + 1. The
/// consumer reads a slot once sequence == head + 1 and frees it by writing head + capacity.
/// </para>
/// <para>
/// The peer writes sequence words, so each value read is checked against the few the protocol
/// allows; any other value is a <see cref="ProtocolViolationException"/>, never a loop or an
/// out-of-bounds access. Slot contents are validated by the caller after reading them once.
/// </para>
/// </summary>
internal sealed unsafe class ControlRing
{
    private readonly byte* _slots;
    private readonly long _mask;
    private readonly string _name;

    // Producer state (this process only). Padded away from the consumer's head.
    private PaddedLong _tail;

    // Consumer state (the receiver only).
    private PaddedLong _head;

    public ControlRing(byte* slots, int slotSize, int slotCount, string name)
    {
        _slots = slots;
        SlotSize = slotSize;
        Capacity = slotCount;
        _mask = slotCount - 1;
        _name = name;
    }

    public int SlotSize { get; }

    public long Capacity { get; }

    private long* Sequence(long position) => (long*)(_slots + (position & _mask) * SlotSize);

    /// <summary>Sets every slot's sequence to its index; only on a ring nobody uses yet.</summary>
    public void InitializeSequences()
    {
        for (long i = 0; i < Capacity; i++)
        {
            *Sequence(i) = i;
        }
    }

    /// <summary>Claims the next slot if one is free.</summary>
    /// <returns>The slot (its first 8 bytes are the sequence word; the caller writes after them), or null when the ring is full.</returns>
    public byte* TryReserve(out long position)
    {
        while (true)
        {
            position = Volatile.Read(ref _tail.Value);
            long* sequence = Sequence(position);
            long diff = Volatile.Read(ref *sequence) - position;
            if (diff == 0)
            {
                if (Interlocked.CompareExchange(ref _tail.Value, position + 1, position) == position)
                {
                    return (byte*)sequence;
                }

                continue;
            }

            if (Volatile.Read(ref _tail.Value) != position)
            {
                continue; // another producer moved on; retry with the new tail
            }

            // The tail is current, so only "the previous lap is not consumed yet" is legitimate.
            if (diff == -Capacity || diff == -Capacity + 1)
            {
                return null;
            }

            throw new ProtocolViolationException($"The peer corrupted {_name} ring slot {position & _mask}: sequence {diff + position} at position {position}.");
        }
    }

    /// <summary>True when a reservation would find a free slot right now (a hint for waiters).</summary>
    public bool HasFreeSlot()
    {
        long position = Volatile.Read(ref _tail.Value);
        long diff = Volatile.Read(ref *Sequence(position)) - position;
        return diff != -Capacity && diff != -Capacity + 1;
    }

    /// <summary>
    /// Producer side: true when fewer than <paramref name="slots"/> slots are taken (a hint, like
    /// <see cref="HasFreeSlot"/>): the slot <paramref name="slots"/> past the tail is free for its lap
    /// only once the consumer has consumed everything published more than that many positions ago.
    /// </summary>
    public bool HasRoomBeyond(long slots) => IsFree(Volatile.Read(ref _tail.Value) + slots);

    /// <summary>Producer side: true when the slot for <paramref name="position"/> (at or ahead of the tail) is free for that lap.</summary>
    public bool IsFree(long position) => Volatile.Read(ref *Sequence(position)) == position;

    /// <summary>Publishes a reserved slot. A full fence (xchg): the wake-word read that follows cannot move before it.</summary>
    public void Publish(long position) => Interlocked.Exchange(ref *Sequence(position), position + 1);

    /// <summary>The slot at the head when the producer has published it; null when the ring is empty.</summary>
    public byte* TryPeek()
    {
        long head = _head.Value;
        long sequence = Volatile.Read(ref *Sequence(head));
        if (sequence == head + 1)
        {
            return (byte*)Sequence(head);
        }

        if (sequence == head)
        {
            return null;
        }

        throw new ProtocolViolationException($"The peer corrupted {_name} ring slot {head & _mask}: sequence {sequence} at head {head}.");
    }

    /// <summary>True when the head slot is published (no validation; the receive loop validates).</summary>
    public bool HasMessage()
    {
        long head = _head.Value;
        return Volatile.Read(ref *Sequence(head)) != head;
    }

    /// <summary>Frees the head slot for the producer's next lap. A full fence, like <see cref="Publish"/>.</summary>
    public void Consume()
    {
        long head = _head.Value;
        Interlocked.Exchange(ref *Sequence(head), head + Capacity);
        _head.Value = head + 1;
    }

    [System.Runtime.InteropServices.StructLayout(System.Runtime.InteropServices.LayoutKind.Explicit, Size = 128)]
    private struct PaddedLong
    {
        [System.Runtime.InteropServices.FieldOffset(64)]
        public long Value;
    }
}
